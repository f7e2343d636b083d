"""The HTTP plumbing of the loopback receiver: a threaded server on one socket.

What any strict little test server needs and nothing of Koala: a stop that wakes the accept
loop at once, a deadline per request instead of per read (a client dripping a byte now and
then cannot hold a thread), bounded body reads, and answers framed for keep-alive.
``http.server`` is imported on the first :func:`server_class` call, not with this module.
"""

from __future__ import annotations

import contextlib
import functools
import io
import ipaddress
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, cast

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = [
    "Answer",
    "BadFraming",
    "DeadlineReader",
    "Run",
    "TooLarge",
    "is_loopback",
    "linger",
    "local_address",
    "read_body",
    "send_answer",
    "server_class",
]

logger = logging.getLogger("flask_koala._receiver")

# After refusing a body it did not read, how long the receiver goes on reading (and
# discarding) what the client still sends before closing: closing on unread data makes the
# kernel send a reset, which can destroy the 413 answer before the client reads it.
_LINGER = 2.0

#: Serves one request read from a connection: (handler, its reader, the run).
Serve = Callable[["BaseHTTPRequestHandler", "DeadlineReader", "Run"], None]


class Answer(NamedTuple):
    """What to send back; a None status means close the connection without a word."""

    status: int | None
    payload: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class Run:
    """One run of the server, start() to stop(): what stop() must wake, shut down and join."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        # A self-pipe: stop() writes to it to wake the accept loop at once, where
        # serve_forever() would only notice a shutdown at its next poll.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count(1)

    def serve(self, server: ThreadingHTTPServer) -> None:
        """Accept connections until ``stop_serving()``; the ``koala-receiver`` thread."""
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self.stopping.is_set():
                ready = [key.fileobj for key, _ in selector.select()]
                if server.socket in ready and not self.stopping.is_set():
                    server.handle_request()  # accepts and hands off to a connection thread

    def stop_serving(self) -> None:
        """Make ``serve()`` return, and requests held by a delay give up waiting."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def add(self, sock: socket.socket, target: Callable[[], None]) -> threading.Thread:
        with self._lock:
            name = f"koala-receiver-conn-{next(self._numbers)}"
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            self._sockets.add(sock)
        return thread

    def discard(self, sock: socket.socket) -> None:
        # Under the lock, so close_all() never shuts down a socket while it is being closed.
        with self._lock:
            self._sockets.discard(sock)

    def close_all(self) -> None:
        """Shut every open connection down, which wakes a thread blocked reading from it."""
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # the peer may have gone already
                    sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in threads if thread.is_alive()]
        if stuck:
            logger.warning("KoalaReceiver.stop(): threads still running: %s", ", ".join(stuck))

    def close(self) -> None:
        self._wake_reader.close()
        self._wake_writer.close()


ServerFactory = Callable[[tuple[str, int], Serve, float, Run], "ThreadingHTTPServer"]


@functools.cache
def server_class() -> ServerFactory:
    """Build the server classes on first use, so importing this module skips http.server."""
    import socketserver
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        timeout = 0  # handle_request() is only called once a connection is waiting

        def __init__(
            self, address: tuple[str, int], serve: Serve, idle_timeout: float, run: Run
        ) -> None:
            self.serve = serve
            self.idle_timeout = idle_timeout
            self.run = run
            if ":" in address[0]:
                self.address_family = socket.AF_INET6
            super().__init__(address, Handler)

        def server_bind(self) -> None:
            # HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup that can
            # take seconds; the name is never used here.
            socketserver.TCPServer.server_bind(self)
            host, port = self.socket.getsockname()[:2]
            self.server_name, self.server_port = str(host), int(port)

        def process_request(self, request: Any, client_address: Any) -> None:
            # ThreadingMixIn forgets daemon threads; keep them so stop() can end and join them.
            thread = self.run.add(
                request, functools.partial(self.process_request_thread, request, client_address)
            )
            thread.start()

        def shutdown_request(self, request: Any) -> None:
            self.run.discard(request)
            super().shutdown_request(request)

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client hanging up mid-request is routine here; never print tracebacks to stderr.
            logger.debug("KoalaReceiver: error on a connection", exc_info=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real clients pool connections
        server_version = "KoalaReceiver"
        # Headers and body go out in two writes; with Nagle's algorithm the second waits for
        # the client's delayed ACK, adding ~40 ms to every answer on a kept-alive connection.
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            server = cast("Server", self.server)
            self.reader = DeadlineReader(self.connection, server.idle_timeout)
            self.rfile = io.BufferedReader(self.reader)

        def log_message(self, format: str, *args: Any) -> None:
            """Stay silent; ``on_call`` is how callers see traffic."""

        def version_string(self) -> str:
            return self.server_version  # no Python version in the Server header

        def dispatch(self) -> None:
            server = cast("Server", self.server)
            server.serve(self, self.reader, server.run)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = dispatch

    return Server


class DeadlineReader(io.RawIOBase):
    """A connection's reads, each allowed only until the current request's deadline.

    A timeout per read would let a client that sends a byte now and then hold its thread
    forever; a deadline per request bounds the idle wait before a request and the time to send
    one alike. ``restart()`` starts the clock again once an answer went out.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self.deadline = time.monotonic() + timeout

    def restart(self) -> None:
        self.deadline = time.monotonic() + self._timeout
        self._sock.settimeout(self._timeout)  # for the answer's writes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            # socket.timeout, which BaseHTTPRequestHandler catches (TimeoutError from 3.10 on)
            raise socket.timeout("the request took longer than idle_timeout")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class BadFraming(Exception):
    """The body's length cannot be told, so the connection cannot be reused."""


class TooLarge(Exception):
    """The body is over the size limit; it was not (all) read, so the connection must close."""


def read_body(handler: BaseHTTPRequestHandler, limit: int) -> bytes:
    """Read the body by Content-Length (or chunked), so keep-alive finds the next request."""
    transfer_encoding = handler.headers.get("Transfer-Encoding")
    if transfer_encoding is not None:
        if transfer_encoding.strip().lower() != "chunked":
            raise BadFraming(f"unsupported Transfer-Encoding {transfer_encoding!r}")
        return _read_chunked(handler, limit)
    length = handler.headers.get("Content-Length")
    if length is None:
        return b""
    try:
        size = int(length)
    except ValueError:
        raise BadFraming(f"invalid Content-Length {length!r}") from None
    if size < 0:
        raise BadFraming(f"invalid Content-Length {length!r}")
    if size > limit:
        raise TooLarge(f"body is {size} bytes, over the limit of {limit} bytes")
    return _read_exactly(handler, size)


def _read_chunked(handler: BaseHTTPRequestHandler, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = handler.rfile.readline(65537)
        if not line:
            raise ConnectionError("client closed the connection mid-body")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadFraming(f"invalid chunk size line {line[:40]!r}") from None
        if size == 0:
            while handler.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers: ignored
            return b"".join(chunks)
        total += size
        if total > limit:
            raise TooLarge(f"chunked body is over the limit of {limit} bytes")
        chunks.append(_read_exactly(handler, size))
        handler.rfile.readline(65537)  # the CRLF closing the chunk


def _read_exactly(handler: BaseHTTPRequestHandler, size: int) -> bytes:
    data = handler.rfile.read(size)
    if len(data) < size:
        raise ConnectionError("client closed the connection mid-body")
    return data


def linger(sock: socket.socket) -> None:
    """Read and discard what the client still sends, for a while, then let it be closed."""
    deadline = time.monotonic() + _LINGER
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # the answer is complete: the client may read it now
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(65536):
                return


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def local_address(host: str) -> str:
    """The address a client on this machine reaches a server bound to ``host`` by: loopback
    for every interface (``0.0.0.0``, ``::``, ``""``), where plain ``http://`` is allowed."""
    return _WILDCARDS.get(host, host)


_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def send_answer(handler: BaseHTTPRequestHandler, status: int, answer: Answer) -> None:
    handler.send_response(status)
    for name, value in answer.headers:
        handler.send_header(name, value)
    if handler.close_connection:  # the client asked for it, or the framing was broken
        handler.send_header("Connection", "close")
    without_body = status in (204, 304)
    if not without_body:
        handler.send_header("Content-Type", answer.content_type)
        handler.send_header("Content-Length", str(len(answer.payload)))
    handler.end_headers()
    if not without_body and handler.command != "HEAD":
        handler.wfile.write(answer.payload)
