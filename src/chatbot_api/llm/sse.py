"""An incremental Server-Sent Events parser, after WHATWG HTML "Interpreting an event stream".

Feed it bytes as they arrive from the network; each `feed()` returns what completed in them:

- `SSEEvent`: dispatched on a blank line, and only if at least one `data` field was seen.
  Several `data` lines are joined with "\\n". `event` defaults to "message"; `id` is the last
  event ID at dispatch time (it persists across events, as the spec says).
- `SSEComment`: a line starting with ":". Servers send them as keep-alives (`: ping`). They are
  not events: they are surfaced only so the caller can count them, and must not reset any
  idle timer.

Lines end in CRLF, LF or CR. A CR that ends one chunk and an LF that starts the next are one
line ending: the line is handled as soon as the CR arrives (no waiting for the next chunk), and
the LF is dropped when it comes. Decoding is incremental UTF-8 (a character split across chunks
is fine; invalid bytes become U+FFFD), and a leading byte-order mark is skipped. At the end of
the stream an event that was not finished by a blank line is discarded, as the spec requires:
the caller simply stops feeding.

This is on the per-token hot path, so it works on whole strings (`find`, `split`, `replace`)
rather than character by character.
"""

from __future__ import annotations

import codecs
from typing import NamedTuple

DEFAULT_MAX_EVENT_SIZE = 4 * 1024 * 1024


# Named tuples, not frozen dataclasses: as immutable, and several times cheaper to build, which
# matters once per token.
class SSEEvent(NamedTuple):
    data: str
    event: str = "message"
    id: str = ""


class SSEComment(NamedTuple):
    text: str


SSEItem = SSEEvent | SSEComment


class SSEError(ValueError):
    """The stream broke the parser's limits (a line or an event larger than `max_event_size`)."""


class SSEParser:
    """Feed bytes, get events. One parser per response body; not thread-safe."""

    __slots__ = (
        "_data",
        "_data_size",
        "_decoder",
        "_event",
        "_last_id",
        "_max",
        "_pending",
        "_skip_lf",
        "_started",
        "_utf8_pending",
        "retry",
    )

    def __init__(self, *, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The incremental decoder holds the start of a character split across chunks.
        self._utf8_pending = False
        self._max = max_event_size
        # An unterminated line carried over to the next chunk; it never holds a CR or LF.
        self._pending = ""
        # The previous chunk ended in CR, so an LF at the start of this one belongs to it.
        self._skip_lf = False
        self._started = False
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._last_id = ""
        self.retry: int | None = None
        """The reconnection time the server asked for (`retry:` field), in milliseconds."""

    @property
    def last_event_id(self) -> str:
        return self._last_id

    def feed(self, chunk: bytes) -> list[SSEItem]:
        """Parse the next piece of the body; return the events and comments it completed."""
        if self._utf8_pending:
            text = self._decode_slowly(chunk)
        else:
            # Fast path: a chunk that is valid UTF-8 on its own (nearly all of them).
            try:
                text = chunk.decode()
            except UnicodeDecodeError:
                text = self._decode_slowly(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text[0:1] == "\n":
                text = text[1:]
        if not text:
            return []
        if "\r" in text:
            # Normalise every line ending to LF. A trailing CR is a complete line ending now;
            # remember it so that the LF of a split CRLF is not read as a second, blank line.
            self._skip_lf = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self._pending:
            text = self._pending + text
        lines = text.split("\n")
        pending = lines.pop()
        if len(pending) > self._max:
            raise SSEError(f"an SSE line is longer than {self._max} characters")
        self._pending = pending
        out: list[SSEItem] = []
        for line in lines:
            if not line:
                if self._data:
                    out.append(
                        SSEEvent("\n".join(self._data), self._event or "message", self._last_id)
                    )
                    self._data = []
                    self._data_size = 0
                self._event = ""
                continue
            # `data:` lines are nearly all of the traffic: check for them first.
            if line.startswith("data:"):
                field = "data"
                value = line[6:] if line[5:6] == " " else line[5:]
            else:
                colon = line.find(":")
                if colon == 0:
                    out.append(SSEComment(line[2:] if line[1:2] == " " else line[1:]))
                    continue
                if colon < 0:
                    field, value = line, ""
                else:
                    field = line[:colon]
                    value = (
                        line[colon + 2 :]
                        if line[colon + 1 : colon + 2] == " "
                        else line[colon + 1 :]
                    )
            if field == "data":
                self._data_size += len(value) + 1
                if self._data_size > self._max:
                    raise SSEError(f"an SSE event is larger than {self._max} characters")
                self._data.append(value)
            elif field == "event":
                self._event = value
            elif field == "id":
                if "\0" not in value:
                    self._last_id = value
            elif field == "retry":
                if value.isascii() and value.isdigit():
                    self.retry = int(value)
            # Any other field name is ignored, as the spec requires.
        return out

    def _decode_slowly(self, chunk: bytes) -> str:
        text = self._decoder.decode(chunk)
        self._utf8_pending = bool(self._decoder.getstate()[0])
        return text
