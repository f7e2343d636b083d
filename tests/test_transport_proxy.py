"""The transport through a real forward proxy on 127.0.0.1, routed as requests would."""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask

from flask_koala._delivery import headers
from flask_koala._receiver import KoalaReceiver
from flask_koala._transport import HTTPTransport, TransportError

from .http_parts import (
    ForwardProxy,
    Server,
    TestCA,
    answer,
    answering,
    clean_network_environment,
    read_request,
)
from .support import flushed_stats, visitor
from .test_transport import BODY


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_network_environment(monkeypatch)


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy() as p:
        yield p


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(str(tmp_path))


@pytest.fixture
def tls_server(ca: TestCA) -> Iterator[Server]:
    with answering(lambda n, head: answer(200), ca.server_context) as server:
        yield server


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _post(url: str, **kwargs: Any) -> Any:
    transport = HTTPTransport(**kwargs)
    try:
        return transport.post(url, BODY, headers(), (5.0, 5.0))
    finally:
        transport.close()


def test_an_http_url_goes_through_http_proxy_in_absolute_form(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy, receiver: KoalaReceiver
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    url = f"{receiver.url}/web/projects/pk_test/batch"
    assert _post(url).status == 200
    assert proxy.requests == [("POST", url, None)]
    assert len(receiver.calls) == 1


def test_the_proxy_connection_is_kept_alive(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy, receiver: KoalaReceiver
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    transport = HTTPTransport()
    for _ in range(3):
        transport.post(f"{receiver.url}/web/projects/pk_test/batch", BODY, headers(), 5.0)
    transport.close()
    assert len(proxy.requests) == 3
    assert proxy.connections == 1


def test_an_https_url_goes_through_a_connect_tunnel(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy, tls_server: Server, ca: TestCA
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    assert _post(tls_server.url, ca_bundle=ca.bundle).status == 200
    assert proxy.requests == [("CONNECT", f"127.0.0.1:{tls_server.port}", None)]
    assert len(tls_server.requests) == 1


def test_proxy_credentials_in_the_url_authenticate_the_connect(
    monkeypatch: pytest.MonkeyPatch, tls_server: Server, ca: TestCA
) -> None:
    with ForwardProxy(credentials=("koala", "p@ss word")) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://koala:p%40ss%20word@127.0.0.1:{proxy.port}")
        assert _post(tls_server.url, ca_bundle=ca.bundle).status == 200
    assert proxy.requests[0][2] == _basic("koala", "p@ss word")
    # The credentials go to the proxy only, never to the server behind it.
    assert b"Proxy-Authorization" not in tls_server.requests[0]


def test_proxy_credentials_in_the_url_authenticate_an_absolute_form_request(
    monkeypatch: pytest.MonkeyPatch, receiver: KoalaReceiver
) -> None:
    with ForwardProxy(credentials=("koala", "secret")) as proxy:
        monkeypatch.setenv("http_proxy", f"http://koala:secret@127.0.0.1:{proxy.port}")
        assert _post(f"{receiver.url}/web/projects/pk_test/batch").status == 200
    assert proxy.requests[0][2] == _basic("koala", "secret")


def test_a_407_from_the_proxy_on_connect_is_its_answer(
    monkeypatch: pytest.MonkeyPatch, tls_server: Server, ca: TestCA
) -> None:
    with ForwardProxy(credentials=("koala", "secret")) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        response = _post(tls_server.url, ca_bundle=ca.bundle)
    assert (response.status, response.text) == (407, "proxy says no")
    assert tls_server.requests == []


def test_a_407_from_the_proxy_on_a_plain_request_is_its_answer(
    monkeypatch: pytest.MonkeyPatch, receiver: KoalaReceiver
) -> None:
    with ForwardProxy(credentials=("koala", "secret")) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://koala:wrong@127.0.0.1:{proxy.port}")
        response = _post(f"{receiver.url}/web/projects/pk_test/batch")
    assert response.status == 407
    assert receiver.calls == []


def test_all_proxy_is_used_when_no_scheme_proxy_is_set(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy, receiver: KoalaReceiver
) -> None:
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{proxy.port}")
    assert _post(f"{receiver.url}/web/projects/pk_test/batch").status == 200
    assert len(proxy.requests) == 1


def test_no_proxy_sends_directly(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy, receiver: KoalaReceiver
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "example.org,127.0.0.1")
    assert _post(f"{receiver.url}/web/projects/pk_test/batch").status == 200
    assert proxy.requests == []
    assert len(receiver.calls) == 1


def test_a_proxy_without_a_scheme_is_taken_as_http(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy, receiver: KoalaReceiver
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")
    assert _post(f"{receiver.url}/web/projects/pk_test/batch").status == 200
    assert len(proxy.requests) == 1


@pytest.mark.allow_errors
def test_a_socks_proxy_fails_each_call_at_once_and_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://koala:hunter2@127.0.0.1:1080")
    transport = HTTPTransport()
    for _ in range(2):
        with pytest.raises(TransportError) as raised:
            transport.post("https://127.0.0.1:9/batch", BODY, headers(), 5.0)
        assert raised.value.reason == "proxy_unsupported"
        assert raised.value.retryable is False
    transport.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "HTTPS_PROXY" in message
    assert "socks5" in message
    assert "hunter2" not in caplog.text
    assert errors[0].exc_info is None  # a sentence, not a traceback


@pytest.mark.allow_errors
def test_calls_through_a_socks_proxy_end_failed_without_retries(
    monkeypatch: pytest.MonkeyPatch, make_app: Callable[..., Flask]
) -> None:
    app = make_app({"KOALA_SYNC": True})
    monkeypatch.setenv("HTTP_PROXY", "socks5h://127.0.0.1:1080")
    visitor(app).post("/login/jane")
    stats = flushed_stats(app)
    assert stats.get("failed.proxy_unsupported") == 1, stats
    assert not any(n for key, n in stats.items() if key.startswith("retried")), stats


def test_a_trickling_answer_through_a_proxy_is_cut_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy
) -> None:
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        read_request(conn)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000:
            if stop.wait(0.05):
                return
            conn.sendall(bytes([byte]))

    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    with Server(trickle) as server:
        url = server.url.replace("https:", "http:")
        started = time.monotonic()
        with pytest.raises(TransportError) as raised:
            # The proxy reads the whole answer before relaying it: the attempt's deadline
            # is what ends the wait.
            _post_with(url, (0.3, 0.3))
        stop.set()
    assert raised.value.reason == "timeout"
    assert time.monotonic() - started < 5


def _post_with(url: str, timeout: Any) -> None:
    transport = HTTPTransport()
    try:
        transport.post(url, BODY, headers(), timeout)
    finally:
        transport.close()


def test_a_trickling_answer_through_a_tunnel_is_cut_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy, ca: TestCA
) -> None:
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        read_request(conn)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000:
            if stop.wait(0.05):
                return
            conn.sendall(bytes([byte]))

    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    with Server(trickle, ca.server_context) as server:
        started = time.monotonic()
        transport = HTTPTransport(ca_bundle=ca.bundle)
        with pytest.raises(TransportError) as raised:
            transport.post(server.url, BODY, headers(), (0.3, 0.3))
        transport.close()
        stop.set()
    assert raised.value.reason == "timeout"
    assert time.monotonic() - started < 5


def test_a_long_answer_through_a_tunnel_is_dropped_after_2_kib(
    monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy, ca: TestCA
) -> None:
    hung_up = threading.Event()

    def long_answer(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 400 Bad\r\nContent-Length: 100000\r\n\r\n" + b"x" * 8192)
        conn.settimeout(10)
        try:
            if conn.recv(1) == b"":
                hung_up.set()
        except OSError:
            hung_up.set()

    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    with Server(long_answer, ca.server_context) as server:
        transport = HTTPTransport(ca_bundle=ca.bundle)
        response = transport.post(server.url, BODY, headers(), (2.0, 2.0))
        transport.close()
        assert hung_up.wait(5)
    assert (response.status, response.text) == (400, "x" * 2048)


def test_an_https_proxy_is_spoken_to_over_tls(
    monkeypatch: pytest.MonkeyPatch, receiver: KoalaReceiver, ca: TestCA
) -> None:
    with ForwardProxy(context=ca.server_context) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"https://127.0.0.1:{proxy.port}")
        response = _post(f"{receiver.url}/web/projects/pk_test/batch", ca_bundle=ca.bundle)
    assert response.status == 200
    assert len(proxy.requests) == 1


def test_an_https_url_through_an_https_proxy_is_tls_inside_tls(
    monkeypatch: pytest.MonkeyPatch, tls_server: Server, ca: TestCA
) -> None:
    with ForwardProxy(credentials=("koala", "secret"), context=ca.server_context) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"https://koala:secret@127.0.0.1:{proxy.port}")
        transport = HTTPTransport(ca_bundle=ca.bundle)
        for _ in range(2):
            assert transport.post(tls_server.url, BODY, headers(), 5.0).status == 200
        transport.close()
    assert proxy.requests == [
        ("CONNECT", f"127.0.0.1:{tls_server.port}", _basic("koala", "secret"))
    ]
    assert len(tls_server.requests) == 2


@pytest.mark.allow_errors
@pytest.mark.parametrize("proxy_url", ["http://[bad", "http://:3128", "http://proxy:port"])
def test_a_malformed_proxy_fails_each_call_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, proxy_url: str
) -> None:
    monkeypatch.setenv("https_proxy", proxy_url)
    with pytest.raises(TransportError) as raised:
        _post("https://127.0.0.1:9/batch")
    assert raised.value.reason == "proxy_invalid"
    assert raised.value.retryable is False
    assert "https_proxy" in caplog.text
