"""Durable delivery through Celery (``KOALA_DISPATCHER = "celery"``).

Two halves, joined only by JSON on the broker:

- The web side, :class:`CeleryDispatcher`. The request thread enqueues exactly as in the
  thread engine (a bounded in-memory queue, a few microseconds); one background thread,
  ``flask-koala-1``, turns each batch into a ``flask_koala.deliver`` task message and
  publishes it, bounded by ``KOALA_CELERY_PUBLISH_TIMEOUT``. Publishing from the request
  would cost a broker round trip (hundreds of microseconds on loopback Redis, more across
  a network) on every login; the price of publishing off-thread is a short window, between
  the login's return and the publish, in which a killed process still loses the call.
- The worker side, the task :data:`TASK_NAME`. It needs no Flask app: its arguments carry
  the ready body, the endpoint, the ``message_id`` of every entry, the timeout and the retry
  policy. It posts once per run and classifies the answer with
  :func:`~flask_koala._delivery.attempt`, the thread engine's own rules: 2xx is delivered,
  408/429/5xx and network errors are retried after ``Retry-After`` or the engine's backoff,
  any other 4xx fails for good. A retry re-sends the body unchanged, so Koala sees the same
  ``message_id`` every time and can drop the duplicate a redelivery may cause.

Counting: the web app's :attr:`~flask_koala.Koala.stats` count ``queued``, ``published``
(handed to the broker) and ``dropped`` (``queue_full``, ``shutdown``, ``broker_error``);
whether Koala took a call is known only in the worker, which logs it on the
``flask_koala`` logger and reports it through Celery: the task returns
``{"outcome": "sent", ...}`` or raises :class:`DeliveryFailed`.

Flask is not imported here; neither is Celery, which is only ever handed to us.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from ._config import KoalaConfig, Timeout
from ._delivery import attempt
from ._engine import Engine, Verdict
from ._exceptions import ConfigError, KoalaError
from ._ledger import Ledger, Throttle, redact
from ._payload import Call, build_body, encode_body
from ._retry import RetryPolicy
from ._transport import HTTPTransport, Transport

__all__ = ["TASK_NAME", "CeleryDispatcher", "DeliveryFailed", "register_task", "task_kwargs"]

logger = logging.getLogger("flask_koala")

#: The name the delivery task is registered and published under; stable across releases.
TASK_NAME = "flask_koala.deliver"

# One reconnect when the pooled connection went stale (a restarted Redis), no sleeping:
# anything slower is a broker that is down, and the call is dropped as broker_error.
_PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0,
    "interval_max": 0,
}


class DeliveryFailed(KoalaError):
    """Raised by the task, in the worker, when a call will not be delivered.

    It is one of the task's expected errors (Celery's ``throws``): the task ends in state
    ``FAILURE`` and Celery's ``task_failure`` signal fires, without a traceback in the
    worker's log. No email or cookie is in it.

    Attributes:
        reason: ``"http_400"`` and the like, or ``"retries_exhausted"``.
        status: the last HTTP status Koala answered, if any.
        message_ids: the ids of the calls that failed.
    """

    def __init__(
        self, reason: str, status: Optional[int], error: Optional[str], message_ids: list[str]
    ) -> None:
        if status is not None:
            answer = f"Koala answered HTTP {status}: {error or '(no error text)'}"
        else:
            answer = f"no answer from Koala ({error or 'no detail'})"
        super().__init__(f"{reason}: {answer}")
        self.reason = reason
        self.status = status
        self.error = error
        self.message_ids = message_ids

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles task exceptions; without this it would fall back to KoalaError
        # and treat an expected failure as an unexpected one.
        return (type(self), (self.reason, self.status, self.error, self.message_ids))


# -- the worker side ----------------------------------------------------------------------


def register_task(celery_app: Any) -> Any:
    """Register the delivery task on a Celery app, once; returns the task.

    ``Koala(app, celery=celery_app)`` and ``koala.init_celery(celery_app)`` call this. A
    worker that builds its Celery app without the Flask app calls it itself.
    """
    registered = getattr(celery_app, "_flask_koala_task", None)
    if registered is not None:
        return registered
    task = celery_app.task(
        name=TASK_NAME,
        bind=True,
        # Acknowledged after it ran, so a worker killed mid-call leaves the message on the
        # broker to be redelivered; Koala de-duplicates the second copy by message_id.
        acks_late=True,
        reject_on_worker_lost=True,
        # Retries are decided and counted by the call's own policy, in its arguments.
        max_retries=None,
        ignore_result=True,
        throws=(DeliveryFailed,),
        serializer="json",
    )(_deliver)
    celery_app._flask_koala_task = task
    return task


def _deliver(
    task: Any,
    body: Mapping[str, Any],
    endpoint: str,
    message_ids: list[str],
    timeout: Any = 5.0,
    policy: Optional[Mapping[str, Any]] = None,
    **_newer: Any,  # arguments a newer web process may add; an older worker ignores them
) -> dict[str, Any]:
    """Post the body once; retry it through Celery, or end the call."""
    retries: int = task.request.retries or 0
    retry_policy = _policy(policy)
    outcome = attempt(_transport(), endpoint, encode_body(body), _timeout(timeout))
    count = len(message_ids)
    if outcome.outcome == "sent":
        logger.debug(
            "flask-koala: delivered %d call(s), HTTP %s, after %d retries",
            count,
            outcome.status,
            retries,
        )
        return {
            "outcome": "sent",
            "status": outcome.status,
            "message_ids": list(message_ids),
            "retries": retries,
        }
    reason = outcome.reason or "error"
    error = outcome.error
    if outcome.outcome == "retry" and retries + 1 >= retry_policy.attempts:
        error = f"{reason}: {error or ''}".rstrip(": ")
        reason = "retries_exhausted"
    elif outcome.outcome == "retry":
        wait = outcome.retry_after
        if wait is None:
            wait = retry_policy.backoff(retries)
        logger.debug("flask-koala: retrying %d call(s) in %.2fs (%s)", count, wait, reason)
        raise task.retry(countdown=wait, max_retries=None)
    error = redact(error) if error else None
    _worker_ledger.warn_failed(count, reason, status=outcome.status, error=error)
    raise DeliveryFailed(reason, outcome.status, error, list(message_ids))


# The worker has no app: its failures are only logged, in the ledger's words and rate.
_worker_ledger = Ledger(lambda: None)


_local = threading.local()


def _transport() -> Transport:
    """One keep-alive transport per worker thread, never inherited across a fork."""
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _local.transport = HTTPTransport()
        _local.pid = pid
    transport: Transport = _local.transport
    return transport


def _timeout(value: Any) -> Timeout:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (float(value[0]), float(value[1]))
    return float(value)


def _policy(values: Optional[Mapping[str, Any]]) -> RetryPolicy:
    # On the wire "max_retries" counts retries; RetryPolicy.attempts counts the first try too.
    if not values:
        return RetryPolicy.from_retries(KoalaConfig.celery_max_retries)
    return RetryPolicy(
        attempts=int(values.get("max_retries", KoalaConfig.celery_max_retries)) + 1,
        wait_initial=float(values.get("wait_initial", RetryPolicy.wait_initial)),
        wait_max=float(values.get("wait_max", RetryPolicy.wait_max)),
        wait_exp_base=float(values.get("wait_exp_base", RetryPolicy.wait_exp_base)),
    )


def task_kwargs(
    calls: Sequence[Call], *, endpoint: str, timeout: Timeout, policy: RetryPolicy
) -> dict[str, Any]:
    """The task's keyword arguments for one batch: plain JSON, everything the worker needs."""
    return {
        "body": build_body(calls),
        "endpoint": endpoint,
        "message_ids": [call.message_id for call in calls],
        "timeout": list(timeout) if isinstance(timeout, tuple) else timeout,
        "policy": {
            "max_retries": policy.attempts - 1,
            "wait_initial": policy.wait_initial,
            "wait_max": policy.wait_max,
            "wait_exp_base": policy.wait_exp_base,
        },
    }


# -- the web side -------------------------------------------------------------------------


class _BrokerLink:
    """A publishing thread's own broker connection, with timeouts that bound a publish.

    The Celery app's shared pool has none by default for Redis: a broker that accepts the
    connection and never answers would hold the publisher forever. This connection takes
    the app's broker settings and adds socket timeouts (Redis and AMQP names alike).

    It is the engine's :class:`~flask_koala._engine.Channel` for the publishing thread: the
    engine opens it through :class:`_PublishHandler` and closes it when its thread ends.
    """

    def __init__(self, handler: _PublishHandler) -> None:
        self._handler = handler
        self._celery = handler.celery
        self._timeout = handler.publish_timeout
        self._connection: Any = None
        self._producer: Any = None

    def handle(self, batch: Sequence[Call]) -> Verdict:
        """Publish the batch as one task; a broker error drops it (``broker_error``)."""
        handler = self._handler
        kwargs = task_kwargs(
            batch, endpoint=handler.endpoint, timeout=handler.timeout, policy=handler.policy
        )
        try:
            self.publish(kwargs, handler.queue)
        except Exception as exc:
            handler.warn_broker_error(exc)
            return Verdict("dropped", "broker_error")
        return Verdict("published")

    def publish(self, kwargs: dict[str, Any], queue: str) -> None:
        """Publish one task message; raises whatever the broker client raises."""
        if self._producer is None:
            self._connection = self._celery.connection_for_write(
                connect_timeout=self._timeout,
                transport_options={
                    "socket_timeout": self._timeout,
                    "socket_connect_timeout": self._timeout,
                    "read_timeout": self._timeout,
                    "write_timeout": self._timeout,
                },
            )
            self._producer = self._celery.amqp.Producer(self._connection, auto_declare=False)
        try:
            self._celery.send_task(
                TASK_NAME,
                kwargs=kwargs,
                queue=queue,
                serializer="json",
                producer=self._producer,
                retry=True,
                retry_policy=_PUBLISH_RETRY_POLICY,
                ignore_result=True,
            )
        except BaseException:
            self.close()  # start from a fresh connection next time
            raise

    def close(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:
                logger.debug("flask-koala: closing the broker connection failed", exc_info=True)


class _PublishHandler:
    """The engine's handler in Celery mode: a batch becomes one task message."""

    def __init__(
        self,
        celery_app: Any,
        *,
        endpoint: str,
        timeout: Timeout,
        policy: RetryPolicy,
        queue: str,
        publish_timeout: float,
    ) -> None:
        self.celery = celery_app
        self.endpoint = endpoint
        self.timeout = timeout
        self.policy = policy
        self.queue = queue
        self.publish_timeout = publish_timeout
        self._throttle = Throttle(time.monotonic)

    def open(self) -> _BrokerLink:
        return _BrokerLink(self)

    def warn_broker_error(self, exc: Exception) -> None:
        # The ledger's "dropped" line names the reason; this one says what the broker did.
        if self._throttle.allow("broker_error") is not None:
            logger.warning(
                "flask-koala: could not publish to the Celery broker (%s: %s); calls are "
                "dropped until it answers again",
                type(exc).__name__,
                redact(str(exc)),
            )


class CeleryDispatcher:
    """Publishes each accepted call as a :data:`TASK_NAME` task, from a background thread.

    Args:
        celery_app: the app whose broker the tasks go to; the task is registered on it.
        endpoint: the Koala batch URL the worker posts to.
        timeout: per attempt, in the worker.
        policy: the worker's retries and backoff; ``attempts`` counts the first try, so
            it is ``KOALA_CELERY_MAX_RETRIES + 1``.
        ledger: counts queued, published and dropped calls.
        queue: the Celery queue (``KOALA_CELERY_QUEUE``).
        publish_timeout: bounds each publish (``KOALA_CELERY_PUBLISH_TIMEOUT``).
        max_queue_size: calls waiting to be published beyond this are dropped.
        shutdown_timeout: how long the exit hook keeps publishing before it gives up.
    """

    def __init__(
        self,
        celery_app: Any,
        *,
        endpoint: str,
        timeout: Timeout,
        policy: RetryPolicy,
        ledger: Ledger,
        queue: str = "koala",
        publish_timeout: float = 1.0,
        max_queue_size: int = 10_000,
        shutdown_timeout: float = 2.0,
    ) -> None:
        register_task(celery_app)
        handler = _PublishHandler(
            celery_app,
            endpoint=endpoint,
            timeout=timeout,
            policy=policy,
            queue=queue,
            publish_timeout=publish_timeout,
        )
        # One thread: a publish takes well under a millisecond while the broker is up. The
        # engine never retries a publish (a broker error drops the call), so one attempt.
        self._engine = Engine(
            handler,
            ledger,
            policy=RetryPolicy(attempts=1),
            max_workers=1,
            max_queue_size=max_queue_size,
            shutdown_timeout=shutdown_timeout,
        )

    @classmethod
    def from_config(cls, config: KoalaConfig, ledger: Ledger, celery_app: Any) -> CeleryDispatcher:
        """The dispatcher for ``KOALA_DISPATCHER = "celery"``.

        Raises:
            ConfigError: no Celery app was given.
        """
        if celery_app is None:
            raise ConfigError(
                "KOALA_DISPATCHER",
                "is 'celery' but no Celery app was given: use Koala(app, celery=celery_app) "
                "or koala.init_celery(celery_app) before init_app (pip install "
                "'flask-koala[celery]')",
            )
        return cls(
            celery_app,
            endpoint=config.endpoint,
            timeout=config.timeout,
            policy=RetryPolicy.from_retries(config.celery_max_retries),
            ledger=ledger,
            queue=config.celery_queue,
            publish_timeout=config.celery_publish_timeout,
            max_queue_size=config.max_queue_size,
            shutdown_timeout=config.shutdown_timeout,
        )

    def submit(self, call: Call, *, wake: bool = True) -> bool:
        """Queue the call for publishing; never blocks on the broker."""
        return self._engine.submit(call, wake=wake)

    def wake(self) -> None:
        """Let the publishing thread start on what is queued."""
        self._engine.wake()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every call taken so far was published (or dropped)."""
        return self._engine.flush(timeout)

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Publish what is queued (bounded by ``timeout``), then stop the thread."""
        return self._engine.shutdown(timeout)

    @property
    def pending(self) -> int:
        """Calls queued for publishing or being published."""
        return self._engine.pending
