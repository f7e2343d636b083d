"""The ``flask koala`` commands: check, identify and receiver."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from click.testing import CliRunner, Result
from flask import Flask
from flask.cli import ScriptInfo

from flask_koala import Koala
from flask_koala._cli import koala_cli
from flask_koala._cli_receiver import format_call
from flask_koala._receiver import KoalaReceiver, ReceivedCall
from flask_koala._redact import mask_key
from flask_koala._transport import Response

from .support import PROFILE_ID, ROOT, Child, koala_of

MASKED = "pk_t…st"  # pk_test, as `check` and `identify` print it
#: The loopback receiver as `python -m flask_koala.testing`, on any free port.
RECEIVER = [sys.executable, "-m", "flask_koala.testing", "--port", "0"]


def invoke(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["koala", *args])


# -- check ----------------------------------------------------------------------------------


def test_check_reports_a_setting_init_app_refuses_without_a_traceback() -> None:
    def create_app() -> Flask:
        app = Flask(__name__)
        Koala(app)  # no KOALA_PUBLIC_KEY
        return app

    result = CliRunner().invoke(koala_cli, ["check"], obj=ScriptInfo(create_app=create_app))

    assert result.exit_code == 1
    assert "problem: KOALA_PUBLIC_KEY: is required while sending is on" in result.output
    assert "Traceback" not in result.output


def test_identify_reports_a_setting_init_app_refuses_without_a_traceback() -> None:
    def create_app() -> Flask:
        app = Flask(__name__)
        Koala(app)  # no KOALA_PUBLIC_KEY
        return app

    script = ScriptInfo(create_app=create_app)
    result = CliRunner().invoke(koala_cli, ["identify", "jane@example.com"], obj=script)

    assert result.exit_code == 1
    assert "problem: KOALA_PUBLIC_KEY: is required while sending is on" in result.output
    assert isinstance(result.exception, SystemExit)  # not the ConfigError's traceback


def test_check_exits_zero_when_logins_will_be_sent(app: Flask) -> None:
    result = invoke(app, "check")

    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("OK")


def test_check_masks_the_public_key(app: Flask) -> None:
    result = invoke(app, "check")

    assert f"public key   {MASKED}\n" in result.output
    assert "pk_test" not in result.output


def test_check_prints_the_endpoint(app: Flask, receiver: KoalaReceiver) -> None:
    result = invoke(app, "check")

    assert f"endpoint     {receiver.url}/web/projects/{MASKED}/batch\n" in result.output


def test_check_prints_the_background_mode(app: Flask) -> None:
    result = invoke(app, "check")

    assert "sending      enabled, in the background (4 thread(s)" in result.output


def test_check_sends_nothing(app: Flask, receiver: KoalaReceiver) -> None:
    invoke(app, "check")

    assert receiver.calls == []


def test_check_disabled_is_a_problem(make_app: Callable[..., Flask]) -> None:
    result = invoke(make_app({"KOALA_ENABLED": False}), "check")

    assert result.exit_code == 1
    assert "sending      disabled" in result.output
    assert "problem: KOALA_ENABLED is False" in result.output


def test_check_suppressed_while_testing_is_fine(make_app: Callable[..., Flask]) -> None:
    result = invoke(make_app({"KOALA_SUPPRESS_SEND": True}), "check")

    assert result.exit_code == 0
    assert "sending      suppressed" in result.output


def test_check_suppressed_outside_testing_is_a_problem(make_app: Callable[..., Flask]) -> None:
    result = invoke(make_app({"TESTING": False, "KOALA_SUPPRESS_SEND": True}), "check")

    assert result.exit_code == 1
    assert "problem: KOALA_SUPPRESS_SEND is True outside testing" in result.output


def test_check_sync_while_testing_is_fine(make_app: Callable[..., Flask]) -> None:
    result = invoke(make_app({"KOALA_SYNC": True}), "check")

    assert result.exit_code == 0
    assert "sending      synchronous" in result.output


def test_check_sync_outside_testing_is_a_problem(make_app: Callable[..., Flask]) -> None:
    result = invoke(make_app({"TESTING": False, "KOALA_SYNC": True}), "check")

    assert result.exit_code == 1
    assert "problem: KOALA_SYNC is True outside testing" in result.output


def test_check_notes_that_koalas_own_hosts_are_suspended(make_app: Callable[..., Flask]) -> None:
    result = invoke(make_app({"KOALA_API_URL": "https://api2.getkoala.com"}), "check")

    assert result.exit_code == 0
    assert "note: Koala's own hosts answer every call 400" in result.output


def test_check_notes_identify_on_login_off(make_app: Callable[..., Flask]) -> None:
    app = make_app({"KOALA_IDENTIFY_ON_LOGIN": False, "KOALA_IDENTIFY_ON_REMEMBER": False})

    result = invoke(app, "check")

    assert "on login     nothing" in result.output
    assert "note: identify on login is off" in result.output


def test_check_prints_a_split_timeout(make_app: Callable[..., Flask]) -> None:
    result = invoke(make_app({"KOALA_TIMEOUT": (1.5, 10)}), "check")

    assert "timeout      1.5s to connect, 10s to read, up to 6 retries" in result.output


def test_check_prints_the_celery_workers_retries_in_celery_mode(
    make_app: Callable[..., Flask],
) -> None:
    celery = pytest.importorskip("celery")
    koala = Koala(celery=celery.Celery("web", broker="redis://127.0.0.1:1/0"))
    app = make_app({"KOALA_DISPATCHER": "celery", "KOALA_CELERY_MAX_RETRIES": 50}, koala)

    result = invoke(app, "check")

    assert "timeout      5s, up to 50 retries (in the Celery worker)" in result.output


def test_check_without_a_key_says_not_set(make_app: Callable[..., Flask]) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": True, "KOALA_PUBLIC_KEY": None})

    assert "public key   (not set)" in invoke(app, "check").output


class _Recorder:
    """A transport that records where it would have posted, and answers 200."""

    def __init__(self, posted: list[str]) -> None:
        self.posted = posted

    def post(self, url: str, body: bytes, headers: Any, timeout: Any) -> Response:
        self.posted.append(url)
        return Response(200, "{}")

    def close(self) -> None:
        pass


def _following_testing(testing: bool, posted: list[str], **config: Any) -> Flask:
    """An app without ``KOALA_SUPPRESS_SEND``, aimed off this machine, made while
    ``TESTING`` is ``testing``; whatever it sends is only recorded in ``posted``."""
    app = Flask(__name__)
    app.config.update(
        {
            "TESTING": testing,
            "KOALA_PUBLIC_KEY": "pk_test",
            "KOALA_API_URL": "https://collector.example.com",
            **config,
        }
    )
    Koala(app, transport_factory=functools.partial(_Recorder, posted))
    return app


def test_check_follows_testing_set_after_the_factory() -> None:
    app = _following_testing(False, [])
    app.config["TESTING"] = True  # as an app fixture does once the factory has run

    result = invoke(app, "check")

    assert result.exit_code == 0
    assert "sending      suppressed" in result.output


def test_check_follows_testing_turned_off_after_the_factory() -> None:
    app = _following_testing(True, [])
    app.config["TESTING"] = False

    result = invoke(app, "check")

    assert result.exit_code == 0, result.output
    assert "sending      enabled" in result.output


def test_check_without_a_key_is_a_problem_once_testing_is_turned_off() -> None:
    app = _following_testing(True, [], KOALA_PUBLIC_KEY=None)  # init_app allows it: testing
    app.config["TESTING"] = False

    result = invoke(app, "check")

    assert result.exit_code == 1
    assert "problem: KOALA_PUBLIC_KEY is not set" in result.output


def test_identify_refuses_when_testing_was_set_after_the_factory() -> None:
    posted: list[str] = []
    app = _following_testing(False, posted)
    app.config["TESTING"] = True

    result = invoke(app, "identify", "jane@example.com")

    assert result.exit_code == 1
    assert "suppressed" in result.output
    assert posted == []


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("pk_test", "pk_t…st"),
        ("pk_3f8a9c0d1e2b", "pk_3…2b"),
        ("pk_ab", "pk_…"),
        (None, "(not set)"),
    ],
)
def test_mask_key(key: str | None, shown: str) -> None:
    assert mask_key(key) == shown


# -- identify -------------------------------------------------------------------------------


def test_identify_delivers_and_exits_zero(app: Flask, receiver: KoalaReceiver) -> None:
    result = invoke(app, "identify", "jane@example.com", "--profile-id", PROFILE_ID)

    assert result.exit_code == 0, result.output
    assert "HTTP 200 {}" in result.output
    assert receiver.bodies[0]["profile_id"] == PROFILE_ID
    assert receiver.violations == []


def test_identify_sends_traits_as_strings(app: Flask, receiver: KoalaReceiver) -> None:
    invoke(app, "identify", "jane@example.com", "--trait", "plan=pro", "--trait", "seats=5")

    traits = receiver.bodies[0]["identifies"][0]["traits"]
    assert traits == {"plan": "pro", "seats": "5", "email": "jane@example.com"}


def test_identify_without_profile_id_sends_the_email_only(
    app: Flask, receiver: KoalaReceiver
) -> None:
    result = invoke(app, "identify", "jane@example.com")

    assert "no profile_id (email only)" in result.output
    assert set(receiver.bodies[0]) == {"email", "identifies"}


def test_identify_masks_the_key(app: Flask) -> None:
    result = invoke(app, "identify", "jane@example.com")

    assert f"/web/projects/{MASKED}/batch" in result.output
    assert "pk_test" not in result.output


def test_identify_suspended_exits_nonzero_and_says_so(app: Flask, receiver: KoalaReceiver) -> None:
    receiver.suspend()

    result = invoke(app, "identify", "jane@example.com")

    assert result.exit_code == 1
    assert "HTTP 400" in result.output
    assert "Koala ingest suspended" in result.output
    assert "Point KOALA_API_URL at a Koala-compatible collector" in result.output


def test_identify_tries_once_and_reports_a_temporary_error(
    app: Flask, receiver: KoalaReceiver
) -> None:
    receiver.respond_with(503)

    result = invoke(app, "identify", "jane@example.com")

    assert result.exit_code == 1
    assert "temporary" in result.output
    assert len(receiver.calls) == 1


def test_identify_reports_a_permanent_error(app: Flask, receiver: KoalaReceiver) -> None:
    receiver.respond_with(403, body={"error": "forbidden"})

    result = invoke(app, "identify", "jane@example.com")

    assert result.exit_code == 1
    assert "HTTP 403: forbidden (permanent" in result.output


def test_identify_without_an_answer_exits_nonzero(app: Flask, receiver: KoalaReceiver) -> None:
    receiver.drop_connections(1)

    result = invoke(app, "identify", "jane@example.com")

    assert result.exit_code == 1
    assert f"no answer from {receiver.url} (connection_error" in result.output


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        (
            {"KOALA_SUPPRESS_SEND": True, "KOALA_API_URL": "https://koala.example.com"},
            "KOALA_SUPPRESS_SEND",
        ),
        ({"KOALA_ENABLED": False}, "KOALA_ENABLED"),
    ],
)
def test_identify_refuses_while_sending_is_off(
    make_app: Callable[..., Flask], receiver: KoalaReceiver, config: dict[str, Any], setting: str
) -> None:
    app = make_app(config)

    result = invoke(app, "identify", "jane@example.com")

    assert result.exit_code == 1
    assert setting in result.output
    assert "--force" in result.output
    assert receiver.calls == []


def test_identify_force_sends_while_sending_is_off(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_ENABLED": False})

    assert invoke(app, "identify", "jane@example.com", "--force").exit_code == 0
    assert len(receiver.bodies) == 1


def test_identify_sends_to_a_loopback_collector_while_sending_is_suppressed(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": True})  # TESTING, aimed at the receiver

    result = invoke(app, "identify", "jane@example.com")

    assert result.exit_code == 0
    assert "suppressed" in result.output
    assert len(receiver.bodies) == 1


def test_identify_leaves_the_apps_counters_alone(app: Flask) -> None:
    invoke(app, "identify", "jane@example.com")

    with app.app_context():
        assert koala_of(app).stats["queued"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not-an-email"], "is not an email address"),
        (["jane@example.com", "--profile-id", "nope"], "is not a UUID"),
        (["jane@example.com", "--trait", "plan"], "each --trait is KEY=VALUE"),
        (["jane@example.com", "--trait", "=pro"], "each --trait is KEY=VALUE"),
        (["jane@example.com", "--trait", "plan=\udcff"], "UTF-8 cannot encode"),
        (["jane@example.com", "--trait", "bio=" + "x" * 40_000], "over Koala's 32768-byte"),
    ],
    ids=["not-email", "not-uuid", "no-equals", "no-key", "not-utf8", "too-large"],
)
def test_identify_rejects_bad_input_before_sending(
    app: Flask, receiver: KoalaReceiver, args: list[str], message: str
) -> None:
    result = invoke(app, "identify", *args)

    assert result.exit_code == 2
    assert message in result.output
    assert receiver.calls == []


@pytest.mark.parametrize(
    "args",
    [
        ["jane doe@example.com"],
        ["jane@example.com", "--profile-id", "3f2504e0-4f89-41d3-9a0c-0305e82c330"],
        ["jane@example.com", "--trait", "jane@example.com"],
    ],
)
def test_identify_never_echoes_what_it_refuses(app: Flask, args: list[str]) -> None:
    result = invoke(app, "identify", *args)

    assert result.exit_code == 2
    assert args[-1] not in result.output
    assert "jane" not in result.output.replace("jane@example.com", "")  # the valid one aside
    assert "3f2504e0-4f89" not in result.output


def test_identify_without_a_key_exits_nonzero(make_app: Callable[..., Flask]) -> None:
    app = make_app({"KOALA_ENABLED": False, "KOALA_PUBLIC_KEY": None})

    result = invoke(app, "identify", "jane@example.com", "--force")

    assert result.exit_code == 1
    assert "KOALA_PUBLIC_KEY is not set" in result.output


# -- receiver -------------------------------------------------------------------------------


def test_receiver_on_a_busy_port_exits_nonzero(app: Flask, receiver: KoalaReceiver) -> None:
    result = invoke(app, "receiver", "--port", str(receiver.port))

    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{receiver.port}" in result.output


def test_receiver_help_shows_the_default_port(app: Flask) -> None:
    assert "8787" in invoke(app, "receiver", "--help").output


@pytest.fixture
def console(spawn: Callable[..., Child]) -> Callable[[list[str]], Child]:
    """Start a command with its stderr kept apart from the lines it prints."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return lambda command: spawn(command, env=env, merge_stderr=False)


def post_identify(url: str, key: str = "pk_test") -> requests.Response:
    body = {
        "profile_id": PROFILE_ID,
        "email": "jane@example.com",
        "identifies": [
            {
                "type": "identify",
                "sent_at": "2026-11-28T12:00:00.123Z",
                "traits": {"email": "jane@example.com", "plan": "pro"},
            }
        ],
    }
    headers = {"Content-Type": "application/json", "User-Agent": "test"}
    return requests.post(
        f"{url}/web/projects/{key}/batch", data=json.dumps(body), headers=headers, timeout=5
    )


def listening_url(lines: list[str]) -> str:
    match = re.search(r"listening on (http://\S+)", lines[-1])
    assert match is not None
    return match.group(1)


@pytest.mark.slow
def test_python_m_testing_prints_calls_and_stops_on_ctrl_c(
    console: Callable[[list[str]], Child],
) -> None:
    receiver = console(RECEIVER)
    url = listening_url(receiver.read_until("listening on"))

    assert post_identify(url).status_code == 200
    printed = receiver.read_until("identify traits")
    code = receiver.stop(signal.SIGINT)

    assert re.search(r"POST /web/projects/pk_t…st/batch -> 200 OK$", printed[-3])
    assert printed[-2] == f"  profile_id {PROFILE_ID[:8]}-…, email j***@example.com"
    assert printed[-1] == '  identify traits {"email": "j***@example.com", "plan": "pro"}'
    assert code == 0
    assert "Traceback" not in receiver.stderr


@pytest.mark.slow
def test_flask_koala_receiver_runs_without_an_app(
    spawn: Callable[..., Child], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLASK_APP"}
    command = [sys.executable, "-m", "flask", "koala", "receiver", "--port", "0"]
    receiver = spawn(command, cwd=tmp_path, env=env, merge_stderr=False)  # no app anywhere
    url = listening_url(receiver.read_until("listening on"))
    assert post_identify(url).status_code == 200
    assert receiver.read_until("identify traits")
    assert receiver.stop(signal.SIGINT) == 0


@pytest.mark.slow
def test_flask_koala_receiver_prints_violations_and_stops_on_sigterm(
    console: Callable[[list[str]], Child],
) -> None:
    flask = [sys.executable, "-m", "flask", "--app", "examples.factory_app"]
    receiver = console([*flask, "koala", "receiver", "--port", "0"])
    url = listening_url(receiver.read_until("listening on"))

    requests.post(f"{url}/web/projects/pk_test/batch", data=b"[]", timeout=5)
    printed = receiver.read_until("violation")
    code = receiver.stop(signal.SIGTERM)

    assert printed[-3].endswith("-> 400 Bad Request")
    assert printed[-2] == "  body []"
    assert printed[-1] == "  violation: Content-Type header is missing, expected application/json"
    assert code == 0
    assert "Traceback" not in receiver.stderr


@pytest.mark.slow
def test_receiver_on_every_interface_warns_on_stderr(
    console: Callable[[list[str]], Child],
) -> None:
    receiver = console([*RECEIVER, "--host", "0.0.0.0"])
    banner = receiver.read_until("listening on")[-1]
    code = receiver.stop(signal.SIGINT)

    assert code == 0
    assert "not a loopback address: other machines can send calls to it" in receiver.stderr
    assert re.search(r"listening on 0\.0\.0\.0:\d+ \(from this machine, http://127", banner)


@pytest.mark.slow
def test_receiver_stops_cleanly_when_sigterm_follows_ctrl_c(
    console: Callable[[list[str]], Child],
) -> None:
    receiver = console(RECEIVER)
    receiver.read_until("listening on")
    # Both land while it is stopped, so the SIGTERM is right behind the Ctrl-C (as a
    # supervisor may send it) however this test is scheduled: not after the receiver has
    # stopped and put the default SIGTERM back, which would end it with -15.
    receiver.process.send_signal(signal.SIGSTOP)
    receiver.process.send_signal(signal.SIGINT)
    receiver.process.send_signal(signal.SIGTERM)
    code = receiver.stop(signal.SIGCONT)

    assert code == 0
    assert "Stopped after 0 call(s)." in receiver.seen
    assert receiver.stderr == ""


def other_threads(pid: int) -> list[int]:
    """The ids of a process's threads other than its main one (Linux's /proc)."""
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_receiver_stops_when_another_thread_catches_the_signal(
    console: Callable[[list[str]], Child], signum: int
) -> None:
    receiver = console(RECEIVER)
    receiver.read_until("listening on")
    # kill() with a thread's id hands the signal to that thread, as the kernel may do with
    # any signal sent to the process while the main thread sleeps.
    os.kill(other_threads(receiver.process.pid)[0], signum)
    code = receiver.wait(timeout=10)

    assert code == 0
    assert "Stopped after 0 call(s)." in receiver.seen


@pytest.mark.slow
def test_receiver_on_loopback_says_nothing_on_stderr(
    console: Callable[[list[str]], Child],
) -> None:
    receiver = console(RECEIVER)
    receiver.read_until("listening on")
    code = receiver.stop(signal.SIGINT)

    assert (code, receiver.stderr) == (0, "")


# -- format_call ----------------------------------------------------------------------------


def received(**changes: Any) -> ReceivedCall:
    values: dict[str, Any] = {
        "method": "POST",
        "path": "/web/projects/pk_test/batch",
        "headers": {},
        "raw": b"",
        "body": None,
        "public_key": "pk_test",
        "received_at": 0.0,
        "status": 200,
        "violations": (),
    }
    values.update(changes)
    return ReceivedCall(**values)


def lines_of(call: ReceivedCall) -> list[str]:
    first, *rest = format_call(call).split("\n")
    return [first.split(" ", 1)[1], *rest]  # without the local time


def test_format_call_shows_a_dropped_connection() -> None:
    assert lines_of(received(status=None))[0].endswith("-> connection dropped, no answer")


def test_format_call_shows_a_track_entry() -> None:
    track = {"type": "track", "event": "Signed up", "properties": {"plan": "pro"}}
    body = {"email": "jane@example.com", "events": [track]}

    assert lines_of(received(body=body))[1:] == [
        "  email j***@example.com",
        '  track "Signed up" properties {"plan": "pro"}',
    ]


def test_format_call_shows_a_body_that_is_not_an_object() -> None:
    call = received(raw=b"not json", status=400, violations=("body is not valid JSON",))

    assert lines_of(call)[1:] == ["  body not json", "  violation: body is not valid JSON"]


def test_format_call_shortens_long_traits() -> None:
    body = {"email": "a@b.c", "identifies": [{"type": "identify", "traits": {"x": "y" * 500}}]}

    assert lines_of(received(body=body))[2].endswith("...")


def test_format_call_escapes_control_characters_in_the_path() -> None:
    call = received(path="/web/projects/\x1b]0;pwned\x07/batch", status=404)

    first = lines_of(call)[0]

    assert "\x1b" not in first
    assert "\x07" not in first
    assert "/web/projects/\\x1b]0;…d\\x07/batch" in first  # escaped, and masked as a key


def test_format_call_escapes_control_characters_in_the_email() -> None:
    body = {"email": "eve@exa\x1b[2Jmple.com", "identifies": []}

    assert lines_of(received(body=body))[1] == "  email e***@exa\\x1b[2Jmple.com"


def test_format_call_masks_emails_visitor_ids_and_keys() -> None:
    traits = {"email": "jane@example.com", "note": "key pk_live_123456 for jane%40example.com"}
    body = {
        "profile_id": "3f2504e0-4f89-41d3-9a0c-0305e82c3301",
        "email": "jane@example.com",
        "identifies": [{"type": "identify", "traits": traits}],
    }

    text = "\n".join(lines_of(received(body=body)))

    assert "jane" not in text
    assert "3f2504e0-4f89" not in text
    assert "pk_live_123456" not in text
    assert "profile_id 3f2504e0-…, email j***@example.com" in text


def test_format_call_escapes_c1_controls_and_bidi_overrides_in_traits() -> None:
    traits = {"email": "a@b.c", "name": "\x9b31m\u202eevil"}
    body = {"email": "a@b.c", "identifies": [{"type": "identify", "traits": traits}]}

    line = lines_of(received(body=body))[2]

    assert "\x9b" not in line
    assert "\u202e" not in line
    assert "\\x9b31m\\u202eevil" in line


def test_format_call_escapes_control_characters_in_a_raw_body() -> None:
    call = received(raw=b"\x1b[31mred", status=400)

    assert lines_of(call)[1] == "  body \\x1b[31mred"


def test_format_call_keeps_printable_unicode() -> None:
    body = {"email": "zoë@exämple.com", "identifies": []}

    assert lines_of(received(body=body))[1] == "  email z***@exämple.com"
