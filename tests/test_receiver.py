"""The loopback Koala: contract checks, recording, fault injection and a clean stop."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import select
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import requests
from flask import Flask

from flask_koala import Koala
from flask_koala._receiver import KoalaReceiver, ReceivedCall, check_body

if TYPE_CHECKING:
    from collections.abc import Iterator

PROFILE_ID = "0f8e9c1a-2b3c-4d5e-8f90-a1b2c3d4e5f6"
EMAIL = "ada@example.com"
SENT_AT = "2026-11-28T12:00:00.123Z"
BATCH = "/web/projects/pk_test/batch"
HEADERS = {"Content-Type": "application/json", "User-Agent": "flask-koala/test"}
NO_USER_AGENT = {"Content-Type": "application/json"}
SUSPENDED = {"error": "Koala ingest suspended"}


def identify(**changes: Any) -> dict[str, Any]:
    entry = {
        "type": "identify",
        "sent_at": SENT_AT,
        "traits": {"email": EMAIL},
        "message_id": "11111111-1111-4111-8111-111111111111",
    }
    entry.update(changes)
    return entry


def track(**changes: Any) -> dict[str, Any]:
    entry = {
        "type": "track",
        "event": "Logged in",
        "properties": {},
        "sent_at": SENT_AT,
        "message_id": "22222222-2222-4222-8222-222222222222",
    }
    entry.update(changes)
    return entry


def make_body(**changes: Any) -> dict[str, Any]:
    body = {
        "profile_id": PROFILE_ID,
        "email": EMAIL,
        "identifies": [identify()],
        "events": [track()],
    }
    body.update(changes)
    return body


def post(
    koala: KoalaReceiver,
    body: object = None,
    *,
    path: str = BATCH,
    data: bytes | None = None,
    headers: dict[str, Any] | None = None,
) -> requests.Response:
    if data is None:
        data = json.dumps(make_body() if body is None else body).encode()
    return requests.post(
        koala.url + path, data=data, headers={**HEADERS, **(headers or {})}, timeout=5
    )


def assert_rejected(response: requests.Response, koala: KoalaReceiver, fragment: str) -> None:
    assert response.status_code == 400
    assert fragment in response.json()["error"]
    assert koala.bodies == []
    assert any(fragment in violation for violation in koala.violations)


def receiver_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("koala-receiver")]


@pytest.fixture
def koala() -> Iterator[KoalaReceiver]:
    with KoalaReceiver() as receiver:
        yield receiver


# --------------------------------------------------------------------------- valid calls


def test_valid_body_is_answered_200_and_delivered(koala: KoalaReceiver) -> None:
    response = post(koala)

    assert response.status_code == 200
    assert response.json() == {}
    assert response.headers["Content-Type"] == "application/json"
    assert koala.bodies == [make_body()]
    assert koala.violations == []


def test_call_records_request_details(koala: KoalaReceiver) -> None:
    post(koala)

    [call] = koala.calls
    assert call.method == "POST"
    assert call.path == BATCH
    assert call.public_key == "pk_test"
    assert call.headers["user-agent"] == "flask-koala/test"
    assert json.loads(call.raw) == make_body()
    assert call.body == make_body()
    assert call.status == 200
    assert call.violations == ()
    assert call.received_at <= time.monotonic()


def test_charset_suffix_on_content_type_is_accepted(koala: KoalaReceiver) -> None:
    response = post(koala, headers={"Content-Type": "application/json; charset=utf-8"})

    assert response.status_code == 200
    assert koala.violations == []


def test_email_only_body_is_valid(koala: KoalaReceiver) -> None:
    body = make_body()
    del body["profile_id"]

    assert post(koala, body).status_code == 200


def test_accounts_endpoint_only_needs_a_json_object(koala: KoalaReceiver) -> None:
    response = post(koala, {"domain": "example.com"}, path="/web/projects/pk_test/accounts/batch")

    assert response.status_code == 200
    assert koala.calls[0].public_key == "pk_test"


def test_accounts_endpoint_rejects_a_non_object(koala: KoalaReceiver) -> None:
    response = post(koala, ["example.com"], path="/web/projects/pk_test/accounts/batch")

    assert_rejected(response, koala, "must be a JSON object")


def test_message_ids_lists_identify_then_track_ids_in_order(koala: KoalaReceiver) -> None:
    post(koala)
    post(koala, make_body(identifies=[identify(message_id="33333333-3333-4333-8333-333333333333")]))

    assert koala.message_ids() == [
        "11111111-1111-4111-8111-111111111111",
        "22222222-2222-4222-8222-222222222222",
        "33333333-3333-4333-8333-333333333333",
        "22222222-2222-4222-8222-222222222222",
    ]


def test_calls_is_a_snapshot(koala: KoalaReceiver) -> None:
    post(koala)
    koala.calls.clear()

    assert len(koala.calls) == 1


def test_keep_alive_serves_two_requests_on_one_connection(koala: KoalaReceiver) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", koala.port, timeout=5)
    try:
        statuses = []
        sockets = []
        for _ in range(2):
            conn.request("POST", BATCH, body=json.dumps(make_body()), headers=HEADERS)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            sockets.append(conn.sock)
    finally:
        conn.close()

    assert statuses == [200, 200]
    assert sockets[0] is sockets[1]
    assert len(koala.bodies) == 2


def test_chunked_body_is_read(koala: KoalaReceiver) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", koala.port, timeout=5)
    try:
        chunks = iter([json.dumps(make_body()).encode()])
        conn.request("POST", BATCH, body=chunks, headers=HEADERS, encode_chunked=True)
        status = conn.getresponse().status
    finally:
        conn.close()

    assert status == 200
    assert koala.bodies == [make_body()]


# --------------------------------------------------------------------------- violations


def test_unknown_path_is_answered_404(koala: KoalaReceiver) -> None:
    response = post(koala, path="/v1/batch")

    assert response.status_code == 404
    assert "not a Koala endpoint" in response.json()["error"]
    assert koala.violations == [f"POST /v1/batch: {response.json()['error']}"]
    assert koala.bodies == []


def test_get_on_the_batch_path_is_answered_405(koala: KoalaReceiver) -> None:
    response = requests.get(koala.url + BATCH, timeout=5)

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert len(koala.violations) == 1


def test_query_string_is_a_violation(koala: KoalaReceiver) -> None:
    assert_rejected(post(koala, path=BATCH + "?x=1"), koala, "query string")


def test_url_unsafe_public_key_is_a_violation(koala: KoalaReceiver) -> None:
    assert_rejected(post(koala, path="/web/projects/pk%20x/batch"), koala, "not URL-safe")


def test_missing_user_agent_is_a_violation(koala: KoalaReceiver) -> None:
    # http.client, because requests (urllib3) fills in a User-Agent of its own.
    conn = http.client.HTTPConnection("127.0.0.1", koala.port, timeout=5)
    try:
        conn.request("POST", BATCH, body=json.dumps(make_body()), headers=NO_USER_AGENT)
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()

    assert response.status == 400
    assert "User-Agent" in answer["error"]
    assert koala.bodies == []


def test_wrong_content_type_is_a_violation(koala: KoalaReceiver) -> None:
    response = post(koala, headers={"Content-Type": "text/plain"})

    assert_rejected(response, koala, "Content-Type is 'text/plain'")


def test_non_json_body_is_a_violation(koala: KoalaReceiver) -> None:
    response = post(koala, data=b"profile_id=abc")

    assert_rejected(response, koala, "not valid JSON")
    assert koala.calls[0].body is None


def test_nan_is_not_json(koala: KoalaReceiver) -> None:
    response = post(koala, data=b'{"profile_id": NaN}')

    assert_rejected(response, koala, "NaN is not valid JSON")


def test_non_utf8_body_is_a_violation(koala: KoalaReceiver) -> None:
    assert_rejected(post(koala, data=b'{"email": "\xff@x"}'), koala, "not valid UTF-8")


def test_uppercase_profile_id_is_a_violation(koala: KoalaReceiver) -> None:
    response = post(koala, make_body(profile_id=PROFILE_ID.upper()))

    assert_rejected(response, koala, "profile_id must be a canonical lowercase UUID")


def test_body_without_profile_id_or_email_is_a_violation(koala: KoalaReceiver) -> None:
    body = make_body(identifies=[identify(traits={})])
    del body["profile_id"], body["email"]

    assert_rejected(post(koala, body), koala, "neither profile_id nor email")


def test_more_than_30_entries_is_a_violation(koala: KoalaReceiver) -> None:
    events = [track(message_id=str(uuid.uuid4())) for _ in range(31)]

    assert_rejected(post(koala, make_body(events=events)), koala, "events has 31 entries")


def test_sent_at_without_milliseconds_is_a_violation(koala: KoalaReceiver) -> None:
    body = make_body(identifies=[identify(sent_at="2026-11-28T12:00:00Z")])

    assert_rejected(post(koala, body), koala, "identifies[0].sent_at must be ISO-8601")


def test_traits_email_must_match_top_level_email(koala: KoalaReceiver) -> None:
    body = make_body(identifies=[identify(traits={"email": "eve@example.com"})])

    assert_rejected(post(koala, body), koala, "traits.email must equal the top-level email")


def test_track_without_message_id_is_a_violation(koala: KoalaReceiver) -> None:
    entry = track()
    del entry["message_id"]

    assert_rejected(
        post(koala, make_body(events=[entry])), koala, "events[0].message_id is missing"
    )


def test_unknown_top_level_key_is_a_violation(koala: KoalaReceiver) -> None:
    assert_rejected(post(koala, make_body(userId="42")), koala, "unexpected top-level key")


def test_answer_names_the_first_violation(koala: KoalaReceiver) -> None:
    body = make_body(
        profile_id="nope", email="nope", identifies=[identify(traits={"email": "nope"})]
    )
    response = post(koala, body)

    assert response.json() == {"error": koala.calls[0].violations[0]}
    assert len(koala.calls[0].violations) == 2


# --------------------------------------------------------------------------- check_body


def test_check_body_accepts_a_valid_body() -> None:
    assert check_body(make_body()) == []


def test_check_body_rejects_a_non_object() -> None:
    assert check_body([make_body()]) == ["body must be a JSON object, got an array"]


def test_check_body_rejects_a_body_without_calls() -> None:
    violations = check_body({"profile_id": PROFILE_ID, "identifies": []})

    assert violations == [
        "body carries no calls: identifies, events and page_views are absent or empty"
    ]


def test_check_body_rejects_an_impossible_date() -> None:
    violations = check_body(make_body(identifies=[identify(sent_at="2026-13-01T00:00:00.000Z")]))

    assert violations == [
        "identifies[0].sent_at is not a real date and time: '2026-13-01T00:00:00.000Z'"
    ]


# --------------------------------------------------------------------------- faults


def test_respond_with_answers_statuses_in_order_then_normally(koala: KoalaReceiver) -> None:
    koala.respond_with(503, 429)
    koala.respond_with(500)

    statuses = [post(koala).status_code for _ in range(4)]

    assert statuses == [503, 429, 500, 200]
    assert len(koala.bodies) == 1


def test_respond_with_default_error_body(koala: KoalaReceiver) -> None:
    koala.respond_with(502)

    assert post(koala).json() == {"error": "injected 502"}


def test_respond_with_sends_retry_after(koala: KoalaReceiver) -> None:
    koala.respond_with(429, retry_after=7)
    koala.respond_with(503, retry_after="Wed, 21 Oct 2026 07:28:00 GMT")

    assert post(koala).headers["Retry-After"] == "7"
    assert post(koala).headers["Retry-After"] == "Wed, 21 Oct 2026 07:28:00 GMT"


def test_respond_with_custom_body(koala: KoalaReceiver) -> None:
    koala.respond_with(500, body="<html>Bad gateway</html>")

    response = post(koala)

    assert response.text == "<html>Bad gateway</html>"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_injected_2xx_counts_as_delivered(koala: KoalaReceiver) -> None:
    koala.respond_with(202)

    assert post(koala).status_code == 202
    assert koala.bodies == [make_body()]


def test_respond_with_rejects_a_non_final_status(koala: KoalaReceiver) -> None:
    with pytest.raises(ValueError, match="200 to 599"):
        koala.respond_with(100)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_outage_then_recovery() -> None:
    clock = FakeClock()
    with KoalaReceiver(clock=clock) as koala:
        koala.outage(0.2)

        during = post(koala)
        clock.now += 0.25
        after = post(koala)

    assert during.status_code == 503
    assert after.status_code == 200
    assert len(koala.bodies) == 1


def test_suspend_answers_what_koala_answers_today(koala: KoalaReceiver) -> None:
    koala.suspend()

    response = post(koala)

    assert response.status_code == 400
    assert response.json() == SUSPENDED
    assert koala.bodies == []
    assert koala.violations == []


def test_resume_restores_service(koala: KoalaReceiver) -> None:
    koala.suspend()
    koala.resume()

    assert post(koala).status_code == 200


def test_delay_holds_the_answer(koala: KoalaReceiver) -> None:
    koala.delay(0.05)

    started = time.monotonic()
    response = post(koala)

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.05


def test_drop_connections_then_normal_service(koala: KoalaReceiver) -> None:
    koala.drop_connections(1)

    with pytest.raises(requests.ConnectionError):
        post(koala)
    response = post(koala)

    assert response.status_code == 200
    assert [call.status for call in koala.calls] == [None, 200]
    assert len(koala.bodies) == 1


def test_drop_connections_closes_without_an_answer(koala: KoalaReceiver) -> None:
    koala.drop_connections()
    conn = http.client.HTTPConnection("127.0.0.1", koala.port, timeout=5)
    try:
        conn.request("POST", BATCH, body=json.dumps(make_body()), headers=HEADERS)
        with pytest.raises(http.client.RemoteDisconnected):
            conn.getresponse()
    finally:
        conn.close()


def test_queued_faults_come_before_an_outage_and_suspend(koala: KoalaReceiver) -> None:
    koala.suspend()
    koala.outage(60, status=502)
    koala.respond_with(429)

    statuses = [post(koala).status_code for _ in range(2)]
    koala.outage(0)

    assert statuses == [429, 502]
    assert post(koala).json() == SUSPENDED


def test_respond_with_and_drop_connections_share_one_queue(koala: KoalaReceiver) -> None:
    koala.respond_with(500)
    koala.drop_connections(1)
    koala.respond_with(503)

    first = post(koala).status_code
    with pytest.raises(requests.ConnectionError):
        post(koala)
    third = post(koala).status_code

    assert (first, third) == (500, 503)
    assert [call.status for call in koala.calls] == [500, None, 503]


def test_outage_answers_its_status_with_an_error_body(koala: KoalaReceiver) -> None:
    koala.outage(60, status=504)

    response = post(koala)

    assert (response.status_code, response.json()) == (504, {"error": "injected 504"})
    assert koala.bodies == []


def test_faulted_calls_still_record_their_body(koala: KoalaReceiver) -> None:
    koala.respond_with(503)

    post(koala)

    assert koala.calls[0].body == make_body()
    assert koala.bodies == []


def test_delay_past_the_clients_timeout_is_a_timeout(koala: KoalaReceiver) -> None:
    koala.delay(30)  # stop() at teardown cuts it short

    with pytest.raises(requests.Timeout):
        requests.post(koala.url + BATCH, json=make_body(), headers=HEADERS, timeout=0.2)


@pytest.mark.parametrize("seconds", [-1, float("inf"), float("nan")])
def test_delay_rejects_an_impossible_wait(koala: KoalaReceiver, seconds: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        koala.delay(seconds)


def test_drop_connections_rejects_a_negative_count(koala: KoalaReceiver) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        koala.drop_connections(-1)


def test_reset_forgets_calls_and_faults(koala: KoalaReceiver) -> None:
    post(koala, path="/nope")
    koala.respond_with(500)
    koala.suspend()

    koala.reset()

    assert (koala.calls, koala.bodies, koala.violations) == ([], [], [])
    assert post(koala).status_code == 200


# --------------------------------------------------------------------------- waiting


def test_wait_for_blocks_until_delivered(koala: KoalaReceiver) -> None:
    sender = threading.Thread(target=post, args=(koala,))
    sender.start()
    try:
        assert koala.wait_for(1)
    finally:
        sender.join()


def test_wait_for_returns_false_on_timeout(koala: KoalaReceiver) -> None:
    koala.suspend()
    post(koala)

    assert koala.wait_for(1, timeout=0.05) is False


def test_wait_for_calls_counts_undelivered_calls(koala: KoalaReceiver) -> None:
    koala.suspend()
    post(koala)

    assert koala.wait_for_calls(1, timeout=0.05)


# --------------------------------------------------------------------------- on_call


def test_on_call_sees_each_answered_call() -> None:
    seen: list[ReceivedCall] = []
    with KoalaReceiver(on_call=seen.append) as koala:
        post(koala)
    # stop() joined the connection thread, so the callback has run.

    assert [call.status for call in seen] == [200]


def test_on_call_failure_is_logged_and_service_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    def explode(call: ReceivedCall) -> None:
        raise RuntimeError("printer on fire")

    with KoalaReceiver(on_call=explode) as koala:
        first, second = post(koala), post(koala)

    assert (first.status_code, second.status_code) == (200, 200)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "on_call" in errors[0].getMessage()


# --------------------------------------------------------------------------- lifecycle


def test_url_names_the_bound_port(koala: KoalaReceiver) -> None:
    assert koala.port > 0
    assert koala.url == f"http://127.0.0.1:{koala.port}"


def test_port_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="start"):
        _ = KoalaReceiver().port


def test_start_twice_is_an_error(koala: KoalaReceiver) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        koala.start()


def test_serving_thread_is_named_koala_receiver(koala: KoalaReceiver) -> None:
    assert "koala-receiver" in receiver_threads()


def test_stop_is_idempotent_and_leaves_no_threads() -> None:
    koala = KoalaReceiver().start()
    post(koala)

    koala.stop()
    koala.stop()

    assert receiver_threads() == []


def test_stop_closes_idle_keep_alive_connections() -> None:
    koala = KoalaReceiver().start()
    conn = http.client.HTTPConnection("127.0.0.1", koala.port, timeout=5)
    try:
        conn.request("POST", BATCH, body=json.dumps(make_body()), headers=HEADERS)
        conn.getresponse().read()
        assert any(name.startswith("koala-receiver-conn") for name in receiver_threads())

        koala.stop()

        assert receiver_threads() == []
    finally:
        conn.close()


def test_stop_cuts_a_delayed_request_short() -> None:
    koala = KoalaReceiver().start()
    koala.delay(60)
    errors: list[Exception] = []

    def send() -> None:
        try:
            post(koala)
        except requests.RequestException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    assert koala.wait_for_requests(1)  # the request is in, waiting out the delay

    started = time.monotonic()
    koala.stop()
    stopped_in = time.monotonic() - started
    sender.join()

    assert stopped_in < 30  # far below the 60 s delay: the wait was interrupted
    assert len(errors) == 1
    assert receiver_threads() == []


def test_receiver_can_start_again_after_stop() -> None:
    koala = KoalaReceiver()
    with koala:
        post(koala)
    with koala:
        assert post(koala).status_code == 200
    assert len(koala.calls) == 2


def test_wait_for_requests_sees_a_request_still_held_by_a_delay() -> None:
    koala = KoalaReceiver().start()
    koala.delay(30)
    sender = threading.Thread(target=send_quietly, args=(koala,))
    sender.start()
    try:
        assert koala.wait_for_requests(1)
        assert koala.calls == []  # read, not answered yet
    finally:
        koala.stop()  # cuts the delay short
        sender.join()


def test_wait_for_requests_returns_false_on_timeout(koala: KoalaReceiver) -> None:
    assert koala.wait_for_requests(1, timeout=0.05) is False


def send_quietly(koala: KoalaReceiver) -> None:
    with contextlib.suppress(requests.RequestException):
        post(koala)


# --------------------------------------------------------------------------- limits


def raw_request(koala: KoalaReceiver, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes on a fresh connection; return everything answered until the server closes."""
    with socket.create_connection(("127.0.0.1", koala.port), timeout=5) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def request_head(length: int | None = None, *, chunked: bool = False) -> bytes:
    lines = [f"POST {BATCH} HTTP/1.1", "Host: x", "Content-Type: application/json", "User-Agent: t"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_body_over_koalas_limit_is_answered_413(koala: KoalaReceiver) -> None:
    body = make_body(identifies=[identify(traits={"email": EMAIL, "bio": "x" * 33_000})])

    response = post(koala, body)

    assert response.status_code == 413
    assert "32768 bytes" in response.json()["error"]
    assert koala.bodies == []
    assert koala.calls[0].status == 413
    assert "32768 bytes" in koala.violations[0]


def test_a_large_body_sent_whole_still_gets_its_413(koala: KoalaReceiver) -> None:
    # The client sends all 4 MB before reading; the receiver must not reset the connection
    # (and destroy its answer) by closing on what it left unread.
    response = post(koala, data=b"x" * (4 * 1024 * 1024))

    assert response.status_code == 413
    assert koala.calls[0].raw == b""


def test_body_of_exactly_the_limit_is_read(koala: KoalaReceiver) -> None:
    data = json.dumps(make_body())
    padded = data[:-1] + " " * (32 * 1024 - len(data)) + "}"

    response = post(koala, data=padded.encode())

    assert response.status_code == 200
    assert len(koala.calls[0].raw) == 32 * 1024


def test_the_limit_is_a_constructor_argument() -> None:
    with KoalaReceiver(max_body_bytes=100) as koala:
        assert post(koala).status_code == 413


def test_a_huge_content_length_is_refused_before_the_body_is_read(koala: KoalaReceiver) -> None:
    # Nothing of the announced 200 MB is sent: an answer proves none of it was waited for.
    answer = raw_request(koala, request_head(200 * 1024 * 1024))

    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in answer
    assert koala.calls[0].raw == b""


def test_a_chunked_body_over_the_limit_is_refused(koala: KoalaReceiver) -> None:
    chunk = b"x" * 20_000
    body = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2  # 40,000 bytes; never terminated

    answer = raw_request(koala, request_head(chunked=True), body)

    assert answer.startswith(b"HTTP/1.1 413 ")
    assert koala.bodies == []


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_max_body_bytes_must_be_a_positive_int(limit: Any) -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        KoalaReceiver(max_body_bytes=limit)


def test_a_half_sent_request_is_closed_after_the_idle_timeout() -> None:
    with KoalaReceiver(idle_timeout=0.2) as koala:
        with socket.create_connection(("127.0.0.1", koala.port), timeout=5) as sock:
            sock.sendall(request_head(100) + b'{"email": ')  # and then nothing more

            assert sock.recv(1024) == b""  # the server hung up; no answer
        assert koala.calls == []


def test_a_request_sent_slowly_is_cut_at_the_idle_timeout() -> None:
    head = request_head(10)
    with (
        KoalaReceiver(idle_timeout=0.3) as koala,
        socket.create_connection(("127.0.0.1", koala.port), timeout=5) as sock,
    ):
        # One byte at a time, each well inside the timeout, the whole far past it.
        sent = 0
        while sent < len(head) and not hung_up(sock):
            sock.sendall(head[sent : sent + 1])
            sent += 1
            time.sleep(0.05)

        assert sent < len(head)
        assert koala.calls == []


def hung_up(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> None:
    with KoalaReceiver(idle_timeout=0.2) as koala:
        conn = http.client.HTTPConnection("127.0.0.1", koala.port, timeout=5)
        try:
            conn.request("POST", BATCH, body=json.dumps(make_body()), headers=HEADERS)
            conn.getresponse().read()
            assert conn.sock is not None

            assert conn.sock.recv(1) == b""
        finally:
            conn.close()


def test_the_connection_threads_end_with_their_idle_connections() -> None:
    with KoalaReceiver(idle_timeout=0.2) as koala:
        sockets = [socket.create_connection(("127.0.0.1", koala.port), timeout=5) for _ in range(5)]
        try:
            for sock in sockets:
                assert sock.recv(1) == b""
            deadline = time.monotonic() + 5
            while connection_threads() and time.monotonic() < deadline:
                time.sleep(0.01)

            assert connection_threads() == []
        finally:
            for sock in sockets:
                sock.close()


def connection_threads() -> list[str]:
    return [name for name in receiver_threads() if name.startswith("koala-receiver-conn")]


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan")])
def test_idle_timeout_must_be_positive_and_finite(seconds: float) -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        KoalaReceiver(idle_timeout=seconds)


# --------------------------------------------------------------------------- exposure


def test_a_loopback_bind_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with KoalaReceiver():
        pass

    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_bind_on_every_interface_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with KoalaReceiver("0.0.0.0") as koala:
        port = koala.port

    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"0.0.0.0:{port}" in warning.getMessage()
    assert "not a loopback" in warning.getMessage()


def test_a_bind_on_every_interface_gives_a_loopback_url_an_app_accepts() -> None:
    with KoalaReceiver("0.0.0.0") as koala:
        url = koala.url
        app = Flask(__name__)
        app.config.update(KOALA_PUBLIC_KEY="pk_test", KOALA_API_URL=url)
        Koala(app)  # plain http:// is accepted to loopback only

    assert url == f"http://127.0.0.1:{koala.port}"
