"""Celery mode without a worker: setup, the task's arguments and rules, a broker that is down.

The task itself runs here through Celery's ``apply`` (in this process, retries included)
against the loopback receiver; tests/test_celery_worker.py runs it in a real worker.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from celery import Celery
from flask import Flask

from flask_koala import ConfigError, Koala
from flask_koala._celery_publish import CeleryDispatcher, CeleryPublisher, Verdict, task_kwargs
from flask_koala._celery_redis import RedisList
from flask_koala._config import KoalaConfig
from flask_koala._ledger import Ledger
from flask_koala._payload import Call
from flask_koala._receiver import KoalaReceiver
from flask_koala._retry import RetryPolicy
from flask_koala._state import state_of
from flask_koala.celery import TASK_NAME, DeliveryFailed

from .http_parts import TestCA, answer, answering, clean_network_environment
from .support import PROFILE_ID, ROOT, koala_of, readme_section

pytest.importorskip("redis", reason="kombu's Redis transport needs the redis package")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def celery_app() -> Celery:
    """Nothing listens at its broker: whatever is published fails."""
    return Celery("test", broker=closed_port_url())


@pytest.fixture
def hung_broker() -> Iterator[str]:
    """A broker that takes the connection and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def a_call() -> Call:
    return Call.identify(
        profile_id=PROFILE_ID, email="jane@example.com", traits={"email": "jane@example.com"}
    )


def kwargs_for(
    url: str, call: Call | None = None, *, ca_bundle: str | None = None, **policy: Any
) -> dict[str, Any]:
    """The task's arguments for one call (``a_call()`` unless given) to a Koala at ``url``."""
    return task_kwargs(
        call or a_call(),
        endpoint=f"{url}/web/projects/pk_test/batch",
        timeout=5.0,
        policy=RetryPolicy(**policy),
        ca_bundle=ca_bundle,
    )


def run_task(celery_app: Celery, receiver: KoalaReceiver, **policy: Any) -> Any:
    """Run the task in this process as a worker would, retries included (no waiting)."""
    return celery_app.tasks[TASK_NAME].apply(kwargs=kwargs_for(receiver.url, **policy))


# -- setting up ----------------------------------------------------------------------------


def test_task_is_registered_under_its_documented_name(celery_app: Celery) -> None:
    Koala(celery=celery_app)
    assert TASK_NAME == "flask_koala.deliver"
    assert TASK_NAME in celery_app.tasks


def test_task_is_acked_late_and_requeued_if_the_worker_dies(celery_app: Celery) -> None:
    Koala().init_celery(celery_app)
    task = celery_app.tasks[TASK_NAME]
    assert task.acks_late
    assert task.reject_on_worker_lost


def test_registering_twice_keeps_one_task(celery_app: Celery) -> None:
    first = Koala(celery=celery_app)
    Koala(celery=celery_app)
    assert first is not None
    assert [name for name in celery_app.tasks if name == TASK_NAME] == [TASK_NAME]


def test_celery_mode_without_a_celery_app_fails_at_init(make_app: Callable[..., Flask]) -> None:
    with pytest.raises(ConfigError, match="KOALA_DISPATCHER"):
        make_app({"KOALA_DISPATCHER": "celery"})


def test_celery_app_in_flask_extensions_is_used(celery_app: Celery) -> None:
    app = Flask(__name__)
    app.config.update(KOALA_PUBLIC_KEY="pk_test", KOALA_DISPATCHER="celery")
    app.extensions["celery"] = celery_app
    Koala(app)
    assert TASK_NAME in celery_app.tasks
    state = state_of(app)
    assert state is not None
    assert isinstance(state.pipeline.dispatcher, CeleryDispatcher)


def test_publish_timeout_must_be_positive(make_app: Callable[..., Flask]) -> None:
    with pytest.raises(ConfigError, match="KOALA_CELERY_PUBLISH_TIMEOUT"):
        make_app({"KOALA_CELERY_PUBLISH_TIMEOUT": 0})


def test_a_queue_celery_will_not_create_fails_at_init(make_app: Callable[..., Flask]) -> None:
    celery_app = Celery("web", broker=closed_port_url())
    celery_app.conf.task_create_missing_queues = False
    with pytest.raises(ConfigError, match="KOALA_CELERY_QUEUE"):
        make_app({"KOALA_DISPATCHER": "celery"}, koala=Koala(celery=celery_app))


def test_a_broker_transport_that_cannot_load_fails_the_calls_not_the_setup(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(
        {"KOALA_DISPATCHER": "celery", "KOALA_CELERY_PUBLISH_TIMEOUT": 0.5},
        koala=Koala(celery=Celery("web", broker="no-such-transport://127.0.0.1/0")),
    )
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    assert client.post("/login/jane").status_code == 200
    with app.app_context():
        koala = koala_of(app)
        assert koala.flush(30)
        assert koala.stats["dropped.broker_error"] == 1


def test_setting_up_leaves_the_celery_apps_queues_alone(make_app: Callable[..., Flask]) -> None:
    # A worker that imports the Flask app and runs without -Q consumes every queue the
    # app knows; setting up celery mode must not add Koala's to them.
    celery_app = Celery("web", broker=closed_port_url())
    make_app({"KOALA_DISPATCHER": "celery"}, koala=Koala(celery=celery_app))
    assert "koala" not in celery_app.amqp.queues


def test_default_max_retries_mean_hours_of_retrying() -> None:
    policy = RetryPolicy(attempts=KoalaConfig.celery_max_retries)
    # Full jitter waits half the cap on average.
    expected = sum(min(policy.wait_max, policy.wait_initial * 2**n) / 2 for n in range(1000))
    assert expected > 4 * 3600


DOCUMENTED_COUNTERS = (
    "queued",
    "sent",
    "failed",
    "dropped",
    "skipped",
    "retried",
    "suppressed",
    "published",
    "pending",
    "deferred",
)


@pytest.mark.parametrize(
    "config",
    [
        {"KOALA_DISPATCHER": "celery"},
        {"KOALA_DISPATCHER": "thread"},
        {"KOALA_SYNC": True},
        {"KOALA_SUPPRESS_SEND": True},
        {"KOALA_ENABLED": False},
    ],
    ids=["celery", "thread", "sync", "suppressed", "disabled"],
)
def test_every_documented_counter_exists_from_the_start(
    make_app: Callable[..., Flask], config: dict[str, Any]
) -> None:
    app = make_app(config, koala=Koala(celery=Celery("web", broker=closed_port_url())))
    with app.app_context():
        stats = koala_of(app).stats
        assert {name: stats[name] for name in DOCUMENTED_COUNTERS} == dict.fromkeys(
            DOCUMENTED_COUNTERS, 0
        )


# -- the task's arguments ------------------------------------------------------------------


def test_task_arguments_are_plain_json() -> None:
    call = a_call()
    kwargs = task_kwargs(
        call, endpoint="http://127.0.0.1:1/b", timeout=(1.0, 5.0), policy=RetryPolicy()
    )
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs["message_id"] == call.message_id
    assert kwargs["body"]["identifies"][0]["message_id"] == call.message_id


# -- the task, run in this process ----------------------------------------------------------


def test_task_delivers(celery_app: Celery, receiver: KoalaReceiver) -> None:
    Koala(celery=celery_app)
    result = run_task(celery_app, receiver)
    assert result.get()["outcome"] == "sent"
    assert len(receiver.message_ids()) == 1


def test_task_retries_with_the_same_message_id(celery_app: Celery, receiver: KoalaReceiver) -> None:
    Koala(celery=celery_app)
    receiver.respond_with(503, 429)
    result = run_task(celery_app, receiver, wait_initial=0.01)
    assert result.get()["retries"] == 2
    ids = {c.body["identifies"][0]["message_id"] for c in receiver.calls}
    assert len(receiver.calls) == 3
    assert len(ids) == 1


def test_task_4xx_is_final(celery_app: Celery, receiver: KoalaReceiver) -> None:
    Koala(celery=celery_app)
    receiver.suspend()
    result = run_task(celery_app, receiver)
    with pytest.raises(DeliveryFailed, match=r"http_400.*Koala ingest suspended"):
        result.get()
    assert len(receiver.calls) == 1


def test_task_gives_up_after_max_retries(celery_app: Celery, receiver: KoalaReceiver) -> None:
    Koala(celery=celery_app)
    receiver.outage(60)
    result = run_task(celery_app, receiver, attempts=3, wait_initial=0.01)  # first try + 2
    with pytest.raises(DeliveryFailed, match="retries_exhausted"):
        result.get()
    assert len(receiver.calls) == 3


def test_task_failure_is_logged_without_pii(
    celery_app: Celery, receiver: KoalaReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    Koala(celery=celery_app)
    receiver.respond_with(400, body={"error": "bad jane@example.com"})
    run_task(celery_app, receiver)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "failed (http_400)" in line
    assert "jane" not in line
    assert PROFILE_ID not in line


def test_task_failure_masks_the_workspace_key_whatever_its_shape(
    celery_app: Celery, receiver: KoalaReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    Koala(celery=celery_app)
    receiver.respond_with(404, body={"error": "unknown workspace workspace42"})
    endpoint = f"{receiver.url}/web/projects/workspace42/batch"
    kwargs = task_kwargs(a_call(), endpoint=endpoint, timeout=5.0, policy=RetryPolicy())
    celery_app.tasks[TASK_NAME].apply(kwargs=kwargs)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "failed (http_404)" in line
    assert "workspace42" not in line


class _Retried(Exception):
    def __init__(self, countdown: float, options: dict[str, Any]) -> None:
        self.countdown = countdown
        self.options = options


class _FakeTask:
    """Stands in for the bound task, to see the countdown a retry asks for."""

    class request:
        retries = 0

    def retry(self, countdown: float, max_retries: Any, **options: Any) -> Exception:
        return _Retried(countdown, options)


def test_task_honours_retry_after(receiver: KoalaReceiver) -> None:
    from flask_koala.celery import _deliver

    receiver.respond_with(503, retry_after=7)
    kwargs = kwargs_for(receiver.url)
    with pytest.raises(_Retried) as retried:
        _deliver(_FakeTask(), **kwargs)
    assert retried.value.countdown == 7


def test_a_retry_shows_monitors_the_message_id_never_the_email(
    receiver: KoalaReceiver,
) -> None:
    from flask_koala.celery import _deliver

    receiver.respond_with(503)
    call = a_call()
    kwargs = kwargs_for(receiver.url, call)
    with pytest.raises(_Retried) as retried:
        _deliver(_FakeTask(), **kwargs)
    # Celery would otherwise re-render kwargsrepr from the arguments, body and email included.
    assert retried.value.options["kwargsrepr"] == f"{{'message_id': '{call.message_id}'}}"


def test_task_ignores_arguments_it_does_not_know(
    celery_app: Celery, receiver: KoalaReceiver
) -> None:
    Koala(celery=celery_app)
    kwargs = kwargs_for(receiver.url)
    result = celery_app.tasks[TASK_NAME].apply(kwargs={**kwargs, "from_the_future": 1})
    assert result.get()["outcome"] == "sent"


# A task run on the main thread (a solo pool, or in process), then the process exits.
RUN_ONE_TASK_AND_EXIT = """
import sys
from celery import Celery
from flask_koala._celery_publish import task_kwargs
from flask_koala._payload import Call
from flask_koala._retry import RetryPolicy
from flask_koala.celery import register_task

email = "jane@example.com"
call = Call.identify(profile_id=sys.argv[2], email=email, traits={"email": email})
kwargs = task_kwargs(call, endpoint=sys.argv[1], timeout=5.0, policy=RetryPolicy())
print(register_task(Celery("exit")).apply(kwargs=kwargs).get()["outcome"])
"""


def test_the_tasks_connection_is_closed_at_exit(receiver: KoalaReceiver) -> None:
    endpoint = f"{receiver.url}/web/projects/pk_test/batch"
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", RUN_ONE_TASK_AND_EXIT, endpoint, PROFILE_ID],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout == "sent\n", result.stderr
    assert "ResourceWarning" not in result.stderr


# -- TLS in the worker: the web app's KOALA_CA_BUNDLE ----------------------------------------


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestCA:
    """A test CA nothing trusts by default: no REQUESTS_CA_BUNDLE or proxy from the machine."""
    clean_network_environment(monkeypatch)
    return TestCA(str(tmp_path))


def run_tls_task(celery_app: Celery, ca: TestCA, ca_bundle: str | None) -> Any:
    Koala(celery=celery_app)
    with answering(lambda n, head: answer(200), ca.server_context) as server:
        kwargs = kwargs_for(server.url, ca_bundle=ca_bundle, attempts=1)
        return celery_app.tasks[TASK_NAME].apply(kwargs=kwargs)


def test_task_trusts_the_ca_bundle_in_its_arguments(celery_app: Celery, ca: TestCA) -> None:
    assert run_tls_task(celery_app, ca, ca.bundle).get()["outcome"] == "sent"


def test_task_without_a_ca_bundle_trusts_what_requests_would(
    celery_app: Celery, ca: TestCA
) -> None:
    with pytest.raises(DeliveryFailed, match="CERTIFICATE_VERIFY_FAILED"):
        run_tls_task(celery_app, ca, None).get()


@pytest.mark.allow_errors
def test_task_fails_clearly_when_the_ca_bundle_is_missing_on_the_worker(
    celery_app: Celery, ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = run_tls_task(celery_app, ca, str(tmp_path / "elsewhere.pem"))
    with pytest.raises(DeliveryFailed, match=r"ca_bundle_missing.*KOALA_CA_BUNDLE"):
        result.get()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "flask-koala: KOALA_CA_BUNDLE names a CA bundle that does not exist; "
        "calls to Koala fail until this is changed"
    ]


def test_the_web_app_sends_its_ca_bundle_with_each_task(
    make_app: Callable[..., Flask], ca: TestCA
) -> None:
    app = make_app(
        {"KOALA_DISPATCHER": "celery", "KOALA_CA_BUNDLE": ca.bundle},
        koala=Koala(celery=Celery("web", broker=closed_port_url())),
    )
    state = state_of(app)
    assert state is not None
    dispatcher = state.pipeline.dispatcher
    assert isinstance(dispatcher, CeleryDispatcher)
    _, kwargs, _ = json.loads(dispatcher.handler.message(a_call())[0])
    assert kwargs["ca_bundle"] == ca.bundle


def test_without_koala_ca_bundle_the_task_carries_no_bundle() -> None:
    _, kwargs, _ = json.loads(publisher(closed_port_url()).message(a_call())[0])
    assert "ca_bundle" not in kwargs


# -- the broker is down --------------------------------------------------------------------


def celery_client(make_app: Callable[..., Flask], broker_url: str, **config: Any) -> Any:
    app = make_app(
        {"KOALA_DISPATCHER": "celery", "KOALA_CELERY_PUBLISH_TIMEOUT": 0.5, **config},
        koala=Koala(celery=Celery("web", broker=broker_url)),
    )
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    return app, client


def test_broker_refusing_does_not_fail_the_login(make_app: Callable[..., Flask]) -> None:
    app, client = celery_client(make_app, closed_port_url())
    assert client.post("/login/jane").status_code == 200
    with app.app_context():
        koala = koala_of(app)
        assert koala.flush(30)
        assert koala.stats["dropped.broker_error"] == 1
        assert koala.stats["pending"] == 0


def test_broker_down_is_logged(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app, client = celery_client(make_app, closed_port_url())
    client.post("/login/jane")
    with app.app_context():
        koala_of(app).flush(30)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not publish to the Celery broker" in w for w in warnings)
    assert any("dropped 1 call(s) (broker_error)" in w for w in warnings)


def test_hung_broker_does_not_hold_the_login(
    make_app: Callable[..., Flask], hung_broker: str
) -> None:
    app, client = celery_client(make_app, hung_broker, KOALA_CELERY_PUBLISH_TIMEOUT=2)
    assert client.post("/login/jane").status_code == 200
    with app.app_context():
        koala = koala_of(app)
        # The login returned while the publish was still waiting on the broker.
        assert koala.stats["dropped"] == 0
        assert koala.flush(30)
        assert koala.stats["dropped.broker_error"] == 1


def test_dispatcher_counts_what_it_hands_over(receiver: KoalaReceiver) -> None:
    ledger = Ledger(lambda: None)
    dispatcher = CeleryDispatcher(
        Celery("test", broker=closed_port_url()),
        endpoint=f"{receiver.url}/web/projects/pk_test/batch",
        timeout=5.0,
        policy=RetryPolicy(),
        ledger=ledger,
    )
    assert dispatcher.submit(a_call())
    assert dispatcher.shutdown(30)
    assert not dispatcher.submit(a_call())
    stats = ledger.snapshot()
    assert (stats["queued"], stats["dropped.broker_error"], stats["dropped.shutdown"]) == (1, 1, 1)


# -- the publishing handler ------------------------------------------------------------------


def publisher(broker_url: str, **options: Any) -> CeleryPublisher:
    return CeleryPublisher(
        Celery("web", broker=broker_url),
        endpoint="http://127.0.0.1:1/web/projects/pk_test/batch",
        timeout=(1.0, 5.0),
        policy=RetryPolicy(attempts=9),
        queue="koala-test",
        publish_timeout=0.5,
        **options,
    )


def test_the_message_is_a_celery_protocol_2_task_message() -> None:
    handler = publisher(closed_port_url())
    call = a_call()
    body, headers, properties = handler.message(call)
    assert headers["task"] == TASK_NAME
    assert headers["id"] == headers["root_id"] == properties["correlation_id"]
    assert headers["ignore_result"] is True
    args, kwargs, embed = json.loads(body)
    assert args == []
    assert kwargs == task_kwargs(
        call,
        endpoint="http://127.0.0.1:1/web/projects/pk_test/batch",
        timeout=(1.0, 5.0),
        policy=RetryPolicy(attempts=9),
    )
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_each_message_has_its_own_task_id() -> None:
    handler = publisher(closed_port_url())
    first, second = handler.message(a_call()), handler.message(a_call())
    assert first[1]["id"] != second[1]["id"]


def test_the_arguments_shown_to_monitors_carry_no_email() -> None:
    call = a_call()
    _, headers, _ = publisher(closed_port_url()).message(call)
    assert "jane" not in headers["kwargsrepr"]
    assert "jane" not in headers["argsrepr"]
    assert call.message_id in headers["kwargsrepr"]


def test_opening_a_channel_never_raises_when_the_broker_is_down() -> None:
    channel = publisher(closed_port_url()).open()
    channel.close()


def test_a_broker_that_refuses_is_a_dropped_verdict() -> None:
    channel = publisher(closed_port_url()).open()
    try:
        verdict = channel.handle([a_call()])
    finally:
        channel.close()
    assert isinstance(verdict, Verdict)
    assert (verdict.outcome, verdict.reason) == ("dropped", "broker_error")


def test_a_broker_that_refuses_drops_each_batch_handled_at_once() -> None:
    channel = publisher(closed_port_url()).open()
    try:
        verdicts = channel.handle_many([[a_call()], [a_call()], [a_call()]])
    finally:
        channel.close()
    assert [(v.outcome, v.reason) for v in verdicts] == [("dropped", "broker_error")] * 3


def test_a_redis_channel_unlike_kombus_own_is_left_to_kombus_producer() -> None:
    def connection_class(**kwargs: Any) -> Any:
        raise TypeError("not a redis-py connection class")

    found = RedisList.of(
        SimpleNamespace(transport=SimpleNamespace(driver_type="redis")),
        SimpleNamespace(
            pool=SimpleNamespace(connection_class=connection_class, connection_kwargs={}),
            priority_steps=[0],
        ),
        queue=SimpleNamespace(max_priority=None, expires=None, queue_arguments=None),
        exchange="",
        routing_key="koala",
        headers={},
        properties={},
    )
    assert found is None


# -- the README section --------------------------------------------------------------------


def test_readme_section_examples_run() -> None:
    text = readme_section("Durable delivery through Celery")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        namespace: dict[str, Any] = {"__name__": "readme_example"}
        exec(compile(block, "README.md", "exec"), namespace)
        assert TASK_NAME in namespace["celery_app"].tasks
