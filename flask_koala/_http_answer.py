"""Reading HTTP/1.1 answers off a socket, each bounded in time and in size.

``httptools`` (the C parser uvicorn uses) does the parsing; this module keeps what
flask-koala needs of an answer (its status, ``Retry-After`` and the first 2 KiB of the body)
and decides whether the connection may be kept alive. As HTTP/1.1 asks of a client, interim
``1xx`` answers before the final one are read past (RFC 9110, 15.2), and a header folded
over two lines is taken as one (RFC 9112, 5.2).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Any, Optional

import httptools

__all__ = [
    "AnswerReader",
    "BadAnswer",
    "Response",
    "Silent",
    "read_answer",
    "remaining",
]

# What is kept of an answer's body: enough for Koala's {"error": "..."}.
_MAX_TEXT = 2048
# An answer's status line and headers may take this much; more is not an HTTP answer we want.
_MAX_HEAD = 65536


@dataclasses.dataclass(frozen=True)
class Response:
    """What Koala answered."""

    status: int
    text: str = ""
    retry_after: Optional[str] = None


class Silent(Exception):
    """The connection ended before any byte of an answer."""


class BadAnswer(Exception):
    """What came back is not an HTTP answer we can use."""


class AnswerReader:
    """Reads the answers that come back on one connection, one after the other.

    The parser and the 2 KiB buffer are made once per connection and reused for each of its
    answers; each answer keeps its status, ``Retry-After`` and the first 2 KiB of its body.
    A reader whose answer was not kept alive, or failed, is dropped with its connection.
    """

    __slots__ = (
        "_body",
        "_complete",
        "_connection",
        "_extra",
        "_head_done",
        "_interim",
        "_kept",
        "_parser",
        "_retry_after",
        "_status",
        "_view",
    )

    def __init__(self) -> None:
        self._view = memoryview(bytearray(_MAX_TEXT))
        self._start()
        self._parser = httptools.HttpResponseParser(self)
        # A header folded over two lines (obs-fold) parses only with lenient header values;
        # of the values, only Retry-After's and Connection's are ever read.
        self._parser.set_dangerous_leniencies(lenient_headers=True)

    def _start(self) -> None:
        """Forget the last answer (or the interim one): the next message is the answer."""
        self._body: list[bytes] = []
        self._kept = 0
        self._status = 0
        self._head_done = False
        self._interim = False
        self._complete = False
        self._extra = False  # bytes after the answer: the connection is out of step
        self._retry_after: Optional[str] = None
        self._connection = b""

    # -- httptools' callbacks: each ignores a message that begins after the answer ---------

    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True
        elif self._interim:
            self._start()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._extra:
            return
        if len(name) == 11 and name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1").strip()
        elif len(name) == 10 and name.lower() == b"connection":
            self._connection += b"," + value.lower()

    def on_headers_complete(self) -> None:
        if self._extra:
            return
        status = self._parser.get_status_code()
        if 100 <= status <= 199 and status != 101:
            self._interim = True  # 100 Continue, 103 Early Hints...: the answer follows
        else:
            self._status = status
            self._head_done = True

    def on_body(self, body: bytes) -> None:
        if self._extra:
            return
        room = _MAX_TEXT - self._kept
        if room > 0:
            self._body.append(body[:room])
        self._kept += len(body)

    def on_message_complete(self) -> None:
        if not (self._extra or self._interim):
            self._complete = True

    # -- reading ----------------------------------------------------------------------

    def read(
        self, sock: Any, deadline: float, wait: float, *, tunnel: bool
    ) -> tuple[int, Response]:
        """Read one answer, at most 2 KiB of its body; the status is negative unless kept alive.

        Each read waits at most ``wait`` seconds (the read timeout), and none past
        ``deadline`` (the attempt's); either raises ``socket.timeout``.

        With ``tunnel`` (the answer to a CONNECT) a 2xx ends at its head: what follows is the
        tunnel.
        """
        self._start()
        parser = self._parser
        view = self._view
        # Reads of at most 2 KiB: whatever part of a read is body counts against the 2 KiB,
        # so no more than 2 KiB of body ever leaves the socket.
        received = 0
        want = _MAX_TEXT
        while True:
            sock.settimeout(min(wait, remaining(deadline)))
            try:
                n = sock.recv_into(view[:want])
            except socket.timeout:
                raise
            except OSError:
                if received == 0:
                    raise Silent() from None
                raise
            if n == 0:
                if received == 0:
                    raise Silent()
                if not self._head_done:
                    raise BadAnswer("the connection closed in the middle of the answer's head")
                break  # a body that ends with the connection, or cut short: the status stands
            received += n
            parser.feed_data(view[:n])
            if self._complete:
                break
            if self._head_done:
                if tunnel and 200 <= self._status <= 299:
                    break
                if self._kept >= _MAX_TEXT:
                    break  # the rest is not read; the connection is dropped instead of drained
                # Never read more of the body than the 2 KiB still wanted.
                want = _MAX_TEXT - self._kept
            elif received > _MAX_HEAD:
                raise BadAnswer("the answer's head is larger than 64 KiB")
        status = self._status
        if status < 200:
            raise BadAnswer(f"an answer {status} where a final one was expected")
        text = b"".join(self._body).decode("utf-8", "replace")
        # llhttp's should_keep_alive() is reset once the message is complete, so this is its
        # rule taken by hand: HTTP/1.1 unless "Connection: close", HTTP/1.0 only if asked for.
        # Bytes after the answer (the start of another one) leave the connection out of step.
        tokens = {t.strip() for t in self._connection.split(b",")} if self._connection else ()
        if self._extra:
            kept = False
        elif parser.get_http_version() == "1.1":
            kept = self._complete and b"close" not in tokens
        else:
            kept = self._complete and b"keep-alive" in tokens
        return (status if kept else -status), Response(status, text, self._retry_after)


def read_answer(sock: Any, deadline: float, wait: float, *, tunnel: bool) -> tuple[int, Response]:
    """Read one answer with a reader of its own (:meth:`AnswerReader.read`)."""
    return AnswerReader().read(sock, deadline, wait, tunnel=tunnel)


def remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise socket.timeout("the attempt took longer than KOALA_TIMEOUT allows")
    return remaining
