"""Real network parts on 127.0.0.1 for the transport tests: a scripted server, a forward
proxy (CONNECT and absolute-form, Proxy-Authorization checked), and a test CA.

Threads and plain sockets only, so what the transport sees is what a real peer sends.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import threading
from typing import Callable, Optional

import pytest
import trustme

from flask_koala import _transport

Handler = Callable[[socket.socket], None]

NETWORK_VARIABLES = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
)  # fmt: skip


def clean_network_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: none of the machine's proxies, and each error reported anew."""
    for name in NETWORK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setattr(_transport, "_reported", set())


def read_request(conn: socket.socket) -> Optional[tuple[bytes, bytes]]:
    """One request's head and body (by Content-Length); ``None`` when the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head, rest[:length]


def header(head: bytes, name: str) -> Optional[str]:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode("latin-1")
    return None


def answer(status: int = 200, body: bytes = b"{}", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


class Server:
    """Accepts on 127.0.0.1 and runs ``handler(conn)`` on a thread per connection.

    Attributes:
        connections: how many connections were accepted.
        requests: the heads of requests read through :meth:`serve_requests`.
    """

    def __init__(self, handler: Handler, context: Optional[ssl.SSLContext] = None) -> None:
        self._handler = handler
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        scheme = "https" if self._context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/web/projects/pk_test/batch"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            thread.start()
            with self._lock:
                self._threads.append(thread)

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            if self._context is not None:
                conn = self._context.wrap_socket(conn, server_side=True)
                with self._lock:
                    self._open.append(conn)
            with conn:
                self._handler(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def holding(context: Optional[ssl.SSLContext] = None) -> tuple[Server, threading.Event]:
    """A :class:`Server` that reads each request and never answers, and an event set once
    the first request was read."""
    arrived = threading.Event()

    def hold(conn: socket.socket) -> None:
        if read_request(conn) is not None:
            arrived.set()
            conn.recv(1)  # until the client, or close(), ends the connection

    return Server(hold, context), arrived


def answering(
    server_answer: Callable[[int, bytes], Optional[bytes]],
    context: Optional[ssl.SSLContext] = None,
) -> Server:
    """A :class:`Server` answering each request with ``server_answer(n, head)``.

    ``n`` counts requests on the connection from 0; ``None`` closes it without answering.
    """
    holder: list[Server] = []

    def handle(conn: socket.socket) -> None:
        n = 0
        while True:
            request = read_request(conn)
            if request is None:
                return
            holder[0].requests.append(request[0])
            data = server_answer(n, request[0])
            n += 1
            if data is None:
                return
            conn.sendall(data)

    server = Server(handle, context)
    holder.append(server)
    return server


class ForwardProxy:
    """An HTTP forward proxy: CONNECT tunnels and absolute-form requests, like squid.

    Attributes:
        requests: ``(method, target, Proxy-Authorization or None)`` per request it took.
        connections: client connections accepted.
    """

    def __init__(
        self,
        credentials: Optional[tuple[str, str]] = None,
        context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self._expected = None
        if credentials is not None:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            self._expected = f"Basic {token}"
        self.requests: list[tuple[str, str, Optional[str]]] = []
        self._server = Server(self._handle, context)
        self.port = self._server.port

    @property
    def connections(self) -> int:
        return self._server.connections

    def _handle(self, conn: socket.socket) -> None:
        while True:
            request = read_request(conn)
            if request is None:
                return
            head, body = request
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
            auth = header(head, "Proxy-Authorization")
            self.requests.append((method, target, auth))
            if self._expected is not None and auth != self._expected:
                conn.sendall(
                    answer(407, b"proxy says no", "Proxy-Authenticate: Basic realm=test\r\n")
                )
                continue
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                assert host == "127.0.0.1", host  # never anywhere but loopback
                upstream = socket.create_connection((host, int(port)), timeout=10)
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _pipe(conn, upstream)
                return
            conn.sendall(self._forward(head, body, target))

    def _forward(self, head: bytes, body: bytes, target: str) -> bytes:
        """Send an absolute-form request on as origin-form; the upstream answer, whole."""
        assert target.startswith("http://127.0.0.1:"), target
        rest = target[len("http://") :]
        authority, _, path = rest.partition("/")
        host, _, port = authority.partition(":")
        lines = head.split(b"\r\n")
        method = lines[0].split(b" ")[0]
        kept = [
            line
            for line in lines[1:]
            if not line.lower().startswith((b"proxy-authorization:", b"connection:"))
        ]
        out = b"\r\n".join([method + b" /" + path.encode() + b" HTTP/1.1", *kept])
        with socket.create_connection((host, int(port)), timeout=10) as upstream:
            upstream.sendall(out + b"\r\nConnection: close\r\n\r\n" + body)
            data = b""
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer_head, _, answer_body = data.partition(b"\r\n\r\n")
        keep = [
            line
            for line in answer_head.split(b"\r\n")
            if not line.lower().startswith(b"connection:")
        ]
        return b"\r\n".join(keep) + b"\r\n\r\n" + answer_body

    def close(self) -> None:
        self._server.close()

    def __enter__(self) -> ForwardProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""

    def copy(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    other = threading.Thread(target=copy, args=(b, a), daemon=True)
    other.start()
    copy(a, b)
    other.join(10)
    b.close()


class TestCA:
    """A throwaway CA (trustme) and a server context for 127.0.0.1 signed by it."""

    def __init__(self, directory: str) -> None:
        self._ca = trustme.CA()
        self.bundle = f"{directory}/test-ca.pem"
        self._ca.cert_pem.write_to_path(self.bundle)
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.server_context)

    __test__ = False  # not a test class, whatever its name says
