"""The default transport against the loopback receiver: keep-alive, and how failures read."""

from __future__ import annotations

import socket

import pytest

from flask_koala.delivery import headers
from flask_koala.receiver import KoalaReceiver
from flask_koala.transport import HTTPTransport, TransportError

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
