"""The default transport against the loopback receiver: keep-alive, and how failures read."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Optional

import pytest

from flask_koala._delivery import headers
from flask_koala._receiver import KoalaReceiver
from flask_koala._transport import HTTPTransport, Response, TransportError, _open

from .http_parts import Server, answer, answering, header, holding, read_request
from .support import PROFILE_ID

BODY = (
    b'{"profile_id":"' + PROFILE_ID.encode() + b'","email":"jane@example.com","identifies":'
    b'[{"type":"identify","sent_at":"2026-01-01T00:00:00.000Z",'
    b'"traits":{"email":"jane@example.com"}}]}'
)


def _url(receiver: KoalaReceiver) -> str:
    return f"{receiver.url}/web/projects/pk_test/batch"


def test_posts_and_reads_the_answer(receiver: KoalaReceiver) -> None:
    transport = HTTPTransport()
    response = transport.post(_url(receiver), BODY, headers(), 5.0)
    transport.close()
    assert response.status == 200
    assert receiver.violations == []


def test_reconnects_when_the_server_closed_the_idle_connection() -> None:
    transport = HTTPTransport()
    with KoalaReceiver() as first:
        port = first.port
        assert transport.post(_url(first), BODY, headers(), 5.0).status == 200
    with KoalaReceiver(port=port) as second:  # stop() closed the kept-alive connection
        assert transport.post(_url(second), BODY, headers(), 5.0).status == 200
    transport.close()


def test_a_kept_alive_connection_closed_after_the_request_is_a_connection_error(
    receiver: KoalaReceiver,
) -> None:
    transport = HTTPTransport()
    assert transport.post(_url(receiver), BODY, headers(), 5.0).status == 200
    receiver.drop_connections(2)
    with pytest.raises(TransportError) as raised:
        transport.post(_url(receiver), BODY, headers(), 5.0)
    transport.close()
    assert raised.value.reason == "connection_error"
    assert len(receiver.calls) == 2  # sent once, not sent again behind the caller's back


def test_no_answer_in_time_is_a_timeout(receiver: KoalaReceiver) -> None:
    receiver.delay(2)
    transport = HTTPTransport()
    with pytest.raises(TransportError) as raised:
        transport.post(_url(receiver), BODY, headers(), (1.0, 0.2))
    transport.close()
    assert raised.value.reason == "timeout"


@pytest.mark.parametrize("timeout", [0.6, (5.0, 0.6)], ids=["float", "pair"])
def test_an_answer_slower_than_the_read_timeout_is_a_timeout(
    receiver: KoalaReceiver, timeout: float | tuple[float, float]
) -> None:
    # Within the attempt's connect + read, but later than a read may wait.
    receiver.delay(0.9)
    transport = HTTPTransport()
    with pytest.raises(TransportError) as raised:
        transport.post(_url(receiver), BODY, headers(), timeout)
    transport.close()
    assert raised.value.reason == "timeout"


def abort_while_held(
    transport: HTTPTransport, server: Server, arrived: threading.Event
) -> BaseException:
    """Post on a thread of its own, abort once the server holds the request, and return
    what the post raised (it must have ended)."""
    raised: list[BaseException] = []

    def post() -> None:
        try:
            transport.post(server.url, BODY, headers(), 30.0)
        except BaseException as exc:
            raised.append(exc)

    with server:
        thread = threading.Thread(target=post)
        thread.start()
        assert arrived.wait(5)
        transport.abort()
        thread.join(5)
    transport.close()
    assert not thread.is_alive()
    (error,) = raised
    return error


def test_abort_ends_a_post_waiting_for_its_answer() -> None:
    error = abort_while_held(HTTPTransport(), *holding())

    assert isinstance(error, TransportError)
    assert error.reason == "connection_error"


def test_abort_without_a_connection_does_nothing() -> None:
    transport = HTTPTransport()
    transport.abort()
    transport.close()


def test_refused_connection_is_a_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the post: nobody listens
    transport = HTTPTransport()
    with pytest.raises(TransportError) as raised:
        transport.post(f"http://127.0.0.1:{port}/web/projects/pk_test/batch", BODY, headers(), 5.0)
    assert raised.value.reason == "connection_error"


class Trickle:
    """A server that answers one byte at a time, each well within a read timeout."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000:
                if self._stop.wait(self._interval):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


@pytest.fixture
def unreachable() -> Iterator[list[tuple[str, int]]]:
    """Three addresses that take no connection, as blackholed ones do: each listener's
    accept queue (``listen(0)``) is full, so Linux drops every further SYN."""
    held: list[socket.socket] = []
    addresses = []
    for _ in range(3):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        held += [listener, socket.create_connection(listener.getsockname())]
        addresses.append(listener.getsockname())
    yield addresses
    for sock in held:
        sock.close()


def test_a_host_whose_addresses_all_hang_fails_within_the_attempts_deadline(
    unreachable: list[tuple[str, int]],
) -> None:
    addresses = [(socket.AF_INET, socket.SOCK_STREAM, 0, "", a) for a in unreachable]
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        _open(addresses, 1.0, started + 1.2)  # connect 1 s, read 0.2 s
    # One connect timeout and what the deadline left: 1.2 s, where three whole connect
    # timeouts, one per address (socket.create_connection), would take 3.
    assert time.monotonic() - started < 2.5


def test_the_next_address_is_tried_when_one_hangs(unreachable: list[tuple[str, int]]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        reachable = listener.getsockname()
        addresses = [
            (socket.AF_INET, socket.SOCK_STREAM, 0, "", a) for a in (unreachable[0], reachable)
        ]
        with _open(addresses, 0.3, time.monotonic() + 5) as sock:
            assert sock.getpeername() == reachable


def test_an_answer_trickling_in_is_cut_at_the_attempts_deadline() -> None:
    trickle = Trickle(interval=0.05)
    transport = HTTPTransport()
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as raised:
            transport.post(f"http://127.0.0.1:{trickle.port}/x", BODY, headers(), (0.3, 0.3))
    finally:
        transport.close()
        trickle.close()
    assert raised.value.reason == "timeout"
    assert time.monotonic() - started < 5  # bounded, where a per-read timeout never fires


def test_a_long_answer_is_read_only_as_far_as_needed(receiver: KoalaReceiver) -> None:
    receiver.respond_with(400, body="x" * 100_000)
    transport = HTTPTransport()
    response = transport.post(_url(receiver), BODY, headers(), 5.0)
    assert response.status == 400
    assert len(response.text) <= 2048
    # The rest of the body was left unread, so the connection is not reused.
    assert transport.post(_url(receiver), BODY, headers(), 5.0).status == 200
    transport.close()


def _ok(n: int, head: bytes) -> bytes:
    return answer(200, b'{"ok":true}')


def test_one_connection_carries_many_requests() -> None:
    with answering(_ok) as server:
        transport = HTTPTransport()
        for _ in range(3):
            assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        transport.close()
    assert server.connections == 1
    assert len(server.requests) == 3


def test_the_request_is_correct_http_1_1() -> None:
    with answering(_ok) as server:
        transport = HTTPTransport()
        transport.post(server.url, BODY, headers(), 5.0)
        transport.close()
    head = server.requests[0]
    assert head.startswith(b"POST /web/projects/pk_test/batch HTTP/1.1\r\n")
    assert header(head, "Host") == f"127.0.0.1:{server.port}"
    assert header(head, "Content-Length") == str(len(BODY))
    assert header(head, "Content-Type") == "application/json"
    assert (header(head, "User-Agent") or "").startswith("flask-koala/")


def test_a_chunked_answer_is_read_and_the_connection_kept() -> None:
    chunked = (
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'9\r\n{"error":\r\n11\r\n "Koala is away"}\r\n0\r\n\r\n'
    )
    with answering(lambda n, head: chunked) as server:
        transport = HTTPTransport()
        first = transport.post(server.url, BODY, headers(), 5.0)
        second = transport.post(server.url, BODY, headers(), 5.0)
        transport.close()
    assert (first.status, first.text) == (400, '{"error": "Koala is away"}')
    assert second.text == first.text
    assert server.connections == 1


def test_connection_close_in_the_answer_opens_a_new_connection() -> None:
    with answering(lambda n, head: answer(200, extra="Connection: close\r\n")) as server:
        transport = HTTPTransport()
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        transport.close()
    assert server.connections == 2
    assert len(server.requests) == 2


def test_an_answer_that_ends_with_the_connection_is_read_to_its_end() -> None:
    def until_close(n: int, head: bytes) -> bytes:
        return b'HTTP/1.1 503 Busy\r\nConnection: close\r\nRetry-After: 7\r\n\r\n{"error":"busy"}'

    with Server(lambda conn: _answer_then_close(conn, until_close(0, b""))) as server:
        transport = HTTPTransport()
        response = transport.post(server.url, BODY, headers(), 5.0)
        transport.close()
    assert response == Response(503, '{"error":"busy"}', "7")


def _answer_then_close(conn: socket.socket, data: bytes) -> None:
    read_request(conn)
    conn.sendall(data)


def test_a_reused_connection_closed_before_answering_fails_the_attempt_then_reconnects() -> None:
    # Each connection takes one request, then hangs up on the next one without a byte of
    # answer. That attempt fails (the engine retries it, counted, after its backoff) rather
    # than being sent again behind the retry policy's back; the next attempt reconnects.
    def first_only(n: int, head: bytes) -> Optional[bytes]:
        return answer(200) if n == 0 else None

    with answering(first_only) as server:
        transport = HTTPTransport()
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        with pytest.raises(TransportError) as raised:
            transport.post(server.url, BODY, headers(), 5.0)
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        transport.close()
    assert raised.value.reason == "connection_error"
    assert server.connections == 2
    assert len(server.requests) == 3


def test_a_new_connection_closed_before_answering_is_a_connection_error() -> None:
    with answering(lambda n, head: None) as server:
        transport = HTTPTransport()
        with pytest.raises(TransportError) as raised:
            transport.post(server.url, BODY, headers(), 5.0)
        transport.close()
    assert raised.value.reason == "connection_error"
    assert len(server.requests) == 1  # not sent again: nothing says it was not taken


def test_a_100_kb_answer_is_dropped_after_2_kib_not_drained() -> None:
    # The server sends the head and 8 KiB of a 100 KB body, then sends nothing more until
    # the client hangs up. A transport that drained the body would wait for the rest
    # until its deadline and fail; one that stops at 2 KiB answers and hangs up.
    hung_up = threading.Event()

    def long_answer(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 400 Bad\r\nContent-Length: 100000\r\n\r\n" + b"x" * 8192)
        conn.settimeout(10)
        try:
            if conn.recv(1) == b"":
                hung_up.set()
        except ConnectionResetError:  # closed with our bytes unread: a reset
            hung_up.set()

    with Server(long_answer) as server:
        transport = HTTPTransport()
        response = transport.post(server.url, BODY, headers(), (2.0, 2.0))
        assert hung_up.wait(5)
        transport.close()
    assert response.status == 400
    assert response.text == "x" * 2048


def test_an_answer_head_without_end_is_cut_at_the_deadline_not_read_forever() -> None:
    def endless_head(conn: socket.socket) -> None:
        read_request(conn)
        with contextlib.suppress(OSError):
            conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 20_000)

    with Server(endless_head) as server:
        transport = HTTPTransport()
        with pytest.raises(TransportError) as raised:
            transport.post(server.url, BODY, headers(), (1.0, 1.0))
        transport.close()
    assert raised.value.reason == "connection_error"


def test_bytes_after_an_answer_make_the_next_request_use_a_new_connection() -> None:
    # Two answers to one request: the connection is out of step, so it is not reused.
    def doubled(n: int, head: bytes) -> bytes:
        return answer(200) + answer(200) if n == 0 else answer(200)

    with answering(doubled) as server:
        transport = HTTPTransport()
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        transport.close()
    assert server.connections == 2


class SlowReader:
    """Reads a request only after a pause, so a large one cannot be written at once."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def __call__(self, conn: socket.socket) -> None:
        time.sleep(0.3)
        request = read_request(conn)
        if request is not None:
            self.bodies.append(request[1])
            conn.sendall(answer(200))


LARGE = b"x" * (8 << 20)  # more than a loopback connection's buffers hold


def test_a_request_larger_than_the_send_buffer_is_written_whole() -> None:
    reader = SlowReader()
    with Server(reader) as server:
        transport = HTTPTransport()
        response = transport.post(server.url, LARGE, headers(), 10.0)
        transport.close()
    assert response.status == 200
    assert reader.bodies == [LARGE]
