"""A loopback HTTP sink that answers every POST ``200 {}`` for as little CPU as Python allows.

Figure 1 times logins on a 2-CPU machine on which the receiving end runs too. A real
Koala, or Segment's API, is on other machines: what it does with a request costs the app's
machine nothing. A receiver that parses headers with ``http.server`` and checks every body
against Koala's contract costs some 140 µs of CPU a request (Segment's former sink, built
on ``http.server`` too, about 250 µs), and that CPU competes with the logins being timed.
flask-koala sends one request per login and Segment one per batch, so that cost landed
mostly on flask-koala's figure. This sink spends some 30 µs a request: one thread, one
``selectors`` loop, a canned answer. The contract is checked by the test suite and by the
other figures, which keep the checking receiver.

It takes bodies framed by ``Content-Length`` only, as flask-koala, ``requests`` and
Segment's client send them, and keeps connections alive.
"""

from __future__ import annotations

import re
import selectors
import socket
import threading

__all__ = ["Sink"]

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class Sink:
    """Serve on 127.0.0.1 in a daemon thread until :meth:`close`; ``url`` is its base URL."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.setblocking(False)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._pending: dict[socket.socket, bytes] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="bench-sink", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close every connection."""
        self._closed = True
        self._thread.join(5)
        for connection in [self._server, *self._pending]:
            connection.close()
        self._selector.close()

    def _serve(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=0.1):
                if key.fileobj is self._server:
                    self._accept()
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]

    def _accept(self) -> None:
        connection, _ = self._server.accept()
        connection.setblocking(False)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending[connection] = b""
        self._selector.register(connection, selectors.EVENT_READ)

    def _read(self, connection: socket.socket) -> None:
        try:
            data = connection.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._selector.unregister(connection)
            del self._pending[connection]
            connection.close()
            return
        buffer = self._pending[connection] + data
        while True:  # every whole request in the buffer gets its answer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            length = _LENGTH.search(buffer, 0, end + 2)
            whole = end + 4 + (int(length.group(1)) if length else 0)
            if len(buffer) < whole:
                break
            buffer = buffer[whole:]
            try:
                connection.sendall(ANSWER)
            except OSError:  # the client went away (or, on loopback never, a full buffer)
                buffer = b""
                break
        self._pending[connection] = buffer
