"""The default transport against the loopback receiver: keep-alive, and how failures read."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from flask_koala._delivery import headers
from flask_koala._receiver import KoalaReceiver
from flask_koala._transport import HTTPTransport, TransportError

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


def test_no_answer_in_time_is_a_timeout(receiver: KoalaReceiver) -> None:
    receiver.delay(2)
    transport = HTTPTransport()
    with pytest.raises(TransportError) as raised:
        transport.post(_url(receiver), BODY, headers(), (1.0, 0.2))
    transport.close()
    assert raised.value.reason == "timeout"


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
