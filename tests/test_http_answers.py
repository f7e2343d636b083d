"""The transport reads every answer HTTP/1.1 allows a server to send, not only the usual one.

Each server here writes raw bytes on 127.0.0.1, in the pieces (TCP segments) given, so the
reader also meets an answer split where a real network may split it.
"""

from __future__ import annotations

import socket
import time

import pytest

from flask_koala._delivery import headers
from flask_koala._transport import HTTPTransport, Response, TransportError

from .http_parts import Server, read_request
from .test_transport import BODY

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def sending(*pieces: bytes, pause: float = 0.01) -> Server:
    """A server answering every request on a connection with ``pieces``, ``pause`` apart."""

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while read_request(conn) is not None:
            for piece in pieces:
                conn.sendall(piece)
                time.sleep(pause)

    return Server(handle)


def post_twice(*pieces: bytes, pause: float = 0.01) -> tuple[Response, Response, int]:
    """Two posts on one transport; their answers and the connections the server saw."""
    with sending(*pieces, pause=pause) as server:
        transport = HTTPTransport()
        try:
            first = transport.post(server.url, BODY, headers(), 5.0)
            second = transport.post(server.url, BODY, headers(), 5.0)
        finally:
            transport.close()
    return first, second, server.connections


def test_a_100_continue_before_the_answer_is_read_past() -> None:
    first, second, connections = post_twice(b"HTTP/1.1 100 Continue\r\n\r\n", OK)
    assert first == second == Response(200, "{}")
    assert connections == 1


def test_interim_answers_in_the_answers_own_segment_are_read_past() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
    first, _, connections = post_twice(interim + OK)
    assert first == Response(200, "{}")
    assert connections == 1


def test_an_early_hints_answers_headers_are_not_the_answers() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>\r\nRetry-After: 99\r\n\r\n"
    busy = b'HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 16\r\n\r\n{"error":"busy"}'
    first, _, _ = post_twice(early, busy)
    assert first == Response(503, '{"error":"busy"}', "7")


def test_a_101_is_not_an_answer() -> None:
    with sending(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n") as server:
        transport = HTTPTransport()
        with pytest.raises(TransportError) as raised:
            transport.post(server.url, BODY, headers(), 5.0)
        transport.close()
    assert raised.value.reason == "connection_error"


def test_a_header_folded_over_two_lines_is_one_header() -> None:
    folded = b"HTTP/1.1 429 Slow Down\r\nRetry-After:\r\n 3\r\nContent-Length: 2\r\n\r\n{}"
    first, _, _ = post_twice(folded)
    assert first == Response(429, "{}", "3")


def test_an_http_1_0_answer_closes_the_connection() -> None:
    _, second, connections = post_twice(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert second == Response(200, "{}")
    assert connections == 2


def test_an_http_1_0_answer_asking_for_keep_alive_keeps_it() -> None:
    kept = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n{}"
    _, _, connections = post_twice(kept)
    assert connections == 1


@pytest.mark.parametrize(
    "bodiless",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    ],
    ids=["204", "304"],
)
def test_an_answer_without_a_body_keeps_the_connection(bodiless: bytes) -> None:
    first, second, connections = post_twice(bodiless)
    assert first.text == second.text == ""
    assert connections == 1


def test_chunk_extensions_and_trailers_are_read_past() -> None:
    chunked = (
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'9;name=value\r\n{"error":\r\n11;q="x"\r\n "Koala is away"}\r\n'
        b"0;end\r\nX-Trailer: yes\r\n\r\n"
    )
    first, second, connections = post_twice(chunked)
    assert first == second == Response(400, '{"error": "Koala is away"}')
    assert connections == 1


def test_an_answer_arriving_a_byte_at_a_time_is_read_whole() -> None:
    answer = b'HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 7\r\n\r\n{"a":1}'
    pieces = [answer[i : i + 1] for i in range(len(answer))]
    first, _, connections = post_twice(*pieces, pause=0.001)
    assert first == Response(503, '{"a":1}', "7")
    assert connections == 1


@pytest.mark.parametrize(
    "framing",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
    ],
    ids=["two-lengths", "bad-length", "length-and-chunked"],
)
def test_folded_headers_being_allowed_leaves_the_framing_strict(framing: bytes) -> None:
    with sending(framing) as server:
        transport = HTTPTransport()
        with pytest.raises(TransportError) as raised:
            transport.post(server.url, BODY, headers(), 5.0)
        transport.close()
    assert raised.value.reason == "connection_error"
