"""TLS to a loopback server signed by a test CA: which CA bundle is trusted, as requests does."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flask_koala import ConfigError
from flask_koala._delivery import headers
from flask_koala._transport import HTTPTransport, Response, TransportError

from .http_parts import (
    Server,
    TestCA,
    answer,
    answering,
    clean_network_environment,
    holding,
    read_request,
)
from .support import build_app, flushed_stats, visitor
from .test_transport import BODY, LARGE, SlowReader, abort_while_held


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_network_environment(monkeypatch)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(str(tmp_path))


@pytest.fixture
def other_ca(tmp_path: Path) -> TestCA:
    (tmp_path / "other").mkdir()
    return TestCA(str(tmp_path / "other"))


@pytest.fixture
def server(ca: TestCA) -> Iterator[Server]:
    with answering(lambda n, head: answer(200), ca.server_context) as s:
        yield s


def _post(url: str, ca_bundle: str | None = None) -> Response:
    transport = HTTPTransport(ca_bundle=ca_bundle)
    try:
        return transport.post(url, BODY, headers(), 5.0)
    finally:
        transport.close()


def test_koala_ca_bundle_is_trusted(server: Server, ca: TestCA) -> None:
    assert _post(server.url, ca.bundle).status == 200


def test_certifi_alone_does_not_trust_the_test_ca(server: Server) -> None:
    with pytest.raises(TransportError) as raised:
        _post(server.url)
    assert raised.value.reason == "connection_error"
    assert "CERTIFICATE_VERIFY_FAILED" in raised.value.detail
    assert server.requests == []


def test_requests_ca_bundle_is_trusted(
    monkeypatch: pytest.MonkeyPatch, server: Server, ca: TestCA
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca.bundle)
    assert _post(server.url).status == 200


def test_curl_ca_bundle_is_trusted(
    monkeypatch: pytest.MonkeyPatch, server: Server, ca: TestCA
) -> None:
    monkeypatch.setenv("CURL_CA_BUNDLE", ca.bundle)
    assert _post(server.url).status == 200


def test_requests_ca_bundle_comes_before_curl_ca_bundle(
    monkeypatch: pytest.MonkeyPatch, server: Server, ca: TestCA, other_ca: TestCA
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", other_ca.bundle)
    monkeypatch.setenv("CURL_CA_BUNDLE", ca.bundle)
    with pytest.raises(TransportError):
        _post(server.url)


def test_koala_ca_bundle_comes_before_the_environment(
    monkeypatch: pytest.MonkeyPatch, server: Server, ca: TestCA, other_ca: TestCA
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", other_ca.bundle)
    assert _post(server.url, ca.bundle).status == 200


@pytest.mark.allow_errors
def test_a_missing_environment_bundle_fails_calls_at_once_and_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
    with pytest.raises(TransportError) as raised:
        _post(server.url)
    assert raised.value.reason == "ca_bundle_missing"
    assert raised.value.retryable is False
    assert "REQUESTS_CA_BUNDLE" in caplog.text


def test_tls_connections_are_kept_alive(server: Server, ca: TestCA) -> None:
    transport = HTTPTransport(ca_bundle=ca.bundle)
    for _ in range(3):
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
    transport.close()
    assert server.connections == 1


def test_a_tls_connection_closed_while_idle_is_replaced_before_sending(ca: TestCA) -> None:
    closed = threading.Event()

    def answer_then_close(conn: socket.socket) -> None:
        if read_request(conn) is not None:
            conn.sendall(answer(200))
        conn.close()  # as a server's keep-alive timeout does
        closed.set()

    with Server(answer_then_close, ca.server_context) as server:
        transport = HTTPTransport(ca_bundle=ca.bundle)
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        assert closed.wait(5)
        assert transport.post(server.url, BODY, headers(), 5.0).status == 200
        transport.close()
    assert server.connections == 2


def test_a_missing_koala_ca_bundle_stops_init_app_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="KOALA_CA_BUNDLE"):
        build_app({"KOALA_CA_BUNDLE": "/nonexistent/ca.pem"})


def test_a_koala_ca_bundle_that_is_not_pem_stops_init_app_naming_the_key(
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="KOALA_CA_BUNDLE: names a CA bundle that holds no"):
        build_app({"KOALA_CA_BUNDLE": str(bundle)})


@pytest.mark.allow_errors
def test_an_environment_bundle_that_is_not_pem_fails_calls_at_once_and_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    server: Server,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    for _ in range(2):
        with pytest.raises(TransportError) as raised:
            _post(server.url)
        assert (raised.value.reason, raised.value.retryable) == ("ca_bundle_invalid", False)
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]  # once, not per call
    assert "REQUESTS_CA_BUNDLE names a CA bundle that holds no" in error.getMessage()
    assert error.exc_info is None


def test_koala_ca_bundle_may_name_a_directory(tmp_path: Path) -> None:
    app = build_app({"KOALA_CA_BUNDLE": str(tmp_path), "KOALA_SUPPRESS_SEND": True})
    assert app.extensions["koala"].config.ca_bundle == str(tmp_path)


def test_koala_ca_bundle_reaches_the_default_transport(server: Server, ca: TestCA) -> None:
    app = build_app(
        {
            "KOALA_API_URL": f"https://127.0.0.1:{server.port}",
            "KOALA_CA_BUNDLE": ca.bundle,
            "KOALA_SYNC": True,
        }
    )
    visitor(app).post("/login/jane")
    stats = flushed_stats(app)
    assert stats["sent"] == 1, stats
    assert server.requests[0].startswith(b"POST /web/projects/pk_test/batch HTTP/1.1")


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is not installed (apt-get install openssl)"
)
def test_a_ca_directory_is_trusted(server: Server, ca: TestCA, tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    directory.mkdir()
    shutil.copy(ca.bundle, directory / "test-ca.pem")
    subprocess.run(["openssl", "rehash", str(directory)], check=True, capture_output=True)
    assert _post(server.url, str(directory)).status == 200


def test_a_koala_ca_bundle_that_is_not_a_path_stops_init_app() -> None:
    with pytest.raises(ConfigError, match="KOALA_CA_BUNDLE"):
        build_app({"KOALA_CA_BUNDLE": 5})


def test_a_request_larger_than_the_send_buffer_is_written_whole_over_tls(ca: TestCA) -> None:
    reader = SlowReader()
    with Server(reader, ca.server_context) as server:
        transport = HTTPTransport(ca_bundle=ca.bundle)
        response = transport.post(server.url, LARGE, headers(), 10.0)
        transport.close()
    assert response.status == 200
    assert reader.bodies == [LARGE]


def test_abort_ends_a_post_waiting_for_its_answer_over_tls(ca: TestCA) -> None:
    error = abort_while_held(HTTPTransport(ca_bundle=ca.bundle), *holding(ca.server_context))

    assert isinstance(error, TransportError)
    assert error.reason == "connection_error"
