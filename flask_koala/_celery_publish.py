"""The web side of Celery mode: publishing each batch as a ``flask_koala.deliver`` task.

:class:`CeleryPublisher` is a batch handler on the engine's seam (``Handler`` / ``Channel``
/ ``Verdict``): the engine owns the queue, the threads, fork and exit; the handler only
turns one batch into one Celery task message and hands it to the broker.

What keeps a publish cheap and prompt:

- **Set up ahead of time.** The publisher imports the broker transport and its client
  (kombu's Redis transport imports ``redis``, which imports ``concurrent.futures``) and
  computes the message's fixed headers when the app is set up, on the thread that calls
  ``init_app``. A first publish at interpreter exit would otherwise import them there, and
  Python refuses the atexit hook such an import registers; and a process killed soon after
  its first logins would lose them while it was still importing.
- **One connection per channel, connected when the channel opens** (on the engine's
  worker thread, never in a process that may fork later), with socket timeouts from
  ``KOALA_CELERY_PUBLISH_TIMEOUT``.
- **A pre-built message.** Celery's protocol 2, exactly as ``apply_async`` would send it,
  but the headers are copied from a template (only ``id``, ``root_id`` and ``kwargsrepr``
  change), the body is encoded once with :mod:`json`, and kombu's producer publishes the
  bytes without serialising them again.

No Flask here. This module is loaded only in celery mode, where the app handed us a Celery
app; kombu and the broker client are reached through that app.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

from celery import signals as celery_signals

from ._celery_redis import PERSISTENT, RedisList
from ._config import KoalaConfig, Timeout
from ._engine import Engine, Verdict
from ._exceptions import ConfigError
from ._ids import new_uuid
from ._ledger import Ledger, Throttle
from ._payload import Call, build_body, kwargsrepr
from ._redact import redact
from ._retry import RetryPolicy
from .celery import TASK_NAME, register_task

__all__ = ["BrokerChannel", "CeleryDispatcher", "CeleryPublisher", "Verdict", "task_kwargs"]

logger = logging.getLogger("flask_koala")

# Celery's protocol 2 body is ``[args, kwargs, embed]``; the task takes no callbacks.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_PUBLISHED = Verdict("published")

#: One task message's body (JSON), task id and ``kwargsrepr``.
Parts = tuple[bytes, str, str]


def task_kwargs(
    call: Call,
    *,
    endpoint: str,
    timeout: Timeout,
    policy: RetryPolicy,
    ca_bundle: Optional[str] = None,
) -> dict[str, Any]:
    """The task's keyword arguments for one call: plain JSON, everything the worker needs."""
    return {
        "body": build_body([call]),
        "message_id": call.message_id,
        **_shared_kwargs(endpoint, timeout, policy, ca_bundle),
    }


def _shared_kwargs(
    endpoint: str, timeout: Timeout, policy: RetryPolicy, ca_bundle: Optional[str]
) -> dict[str, Any]:
    """The task arguments every call of one app shares.

    ``ca_bundle`` (``KOALA_CA_BUNDLE``) is added only when set, so a worker trusts what the
    web app trusts; an app without it publishes the same messages as before.
    """
    extra = {} if ca_bundle is None else {"ca_bundle": ca_bundle}
    return {
        "endpoint": endpoint,
        "timeout": list(timeout) if isinstance(timeout, tuple) else timeout,
        "policy": {
            "max_retries": policy.attempts - 1,  # on the wire: retries, not tries
            "wait_initial": policy.wait_initial,
            "wait_max": policy.wait_max,
            "wait_exp_base": policy.wait_exp_base,
        },
        **extra,
    }


class CeleryPublisher:
    """The handler of Celery mode: opens broker channels that publish one task per batch.

    Building it registers the task on the Celery app, imports the broker client and
    computes the message template; it does not connect (the process may still fork).

    Args:
        celery_app: the app whose broker the tasks go to.
        endpoint: the Koala batch URL the worker posts to.
        timeout: per attempt, in the worker.
        policy: the worker's retries and backoff (``KOALA_CELERY_MAX_RETRIES``).
        queue: the Celery queue (``KOALA_CELERY_QUEUE``).
        publish_timeout: bounds connecting and each publish
            (``KOALA_CELERY_PUBLISH_TIMEOUT``).
        ca_bundle: the CA bundle the worker trusts for TLS (``KOALA_CA_BUNDLE``).
        fast: on a Redis broker, push the message onto the queue's list directly;
            ``False`` publishes every message through kombu's producer.
    """

    def __init__(
        self,
        celery_app: Any,
        *,
        endpoint: str,
        timeout: Timeout,
        policy: RetryPolicy,
        queue: str = "koala",
        publish_timeout: float = 1.0,
        ca_bundle: Optional[str] = None,
        fast: bool = True,
    ) -> None:
        register_task(celery_app)
        #: Push straight onto a Redis list where kombu would (see :mod:`flask_koala._celery_redis`).
        self.fast = fast
        self.celery = celery_app
        self.publish_timeout = publish_timeout
        # The task arguments every batch shares, ready to merge.
        self._shared = _shared_kwargs(endpoint, timeout, policy, ca_bundle)
        self._throttle = Throttle(time.monotonic)
        self._throttle_lock = threading.Lock()
        amqp = celery_app.amqp
        # What send_task would declare and route by: the queue, made if missing, but not
        # added to the app's queues (a worker importing this app would start consuming it).
        queues = amqp.queues
        known = queues.get(queue)
        if known is None and not queues.create_missing:
            raise ConfigError(
                "KOALA_CELERY_QUEUE",
                f"{queue!r} is not one of the Celery app's queues, and its "
                "task_create_missing_queues is off: add the queue to task_queues",
            )
        self.queue = known if known is not None else queues.new_missing(queue)
        exchange = self.queue.exchange
        if getattr(exchange, "type", "direct") == "direct":
            self.exchange, self.routing_key = "", queue  # Celery's anonymous-exchange route
        else:
            self.exchange, self.routing_key = exchange.name, self.queue.routing_key or queue
        # Celery's own protocol-2 headers, for this Celery version; ids are set per message.
        message = amqp.as_task_v2(
            "", TASK_NAME, args=(), kwargs={}, ignore_result=True, argsrepr="()", kwargsrepr="{}"
        )
        self._headers: dict[str, Any] = dict(message.headers)
        self._properties: dict[str, Any] = dict(message.properties)
        self._warm()

    def _warm(self) -> None:
        """Import the broker transport and its client now, without connecting.

        A transport that cannot be imported is left for the first publish to report, as a
        broker error, so that setting the app up never fails on the broker.
        """
        try:
            connection = self.connection()
            try:
                connection.transport  # noqa: B018  (imports kombu's transport and e.g. redis)
            finally:
                connection.release()
        except Exception:
            logger.debug("flask-koala: loading the Celery broker's transport failed", exc_info=True)

    def connection(self) -> Any:
        """A new, unconnected broker connection whose every wait is bounded."""
        return self.celery.connection_for_write(
            connect_timeout=self.publish_timeout,
            transport_options={
                "socket_timeout": self.publish_timeout,
                "socket_connect_timeout": self.publish_timeout,
                "read_timeout": self.publish_timeout,
                "write_timeout": self.publish_timeout,
                # One attempt to connect, no sleeping: a broker that does not answer at
                # once is down, and the batch is dropped as broker_error.
                "max_retries": 0,
                "interval_start": 0,
                "interval_step": 0,
                "interval_max": 0,
            },
        )

    def open(self) -> BrokerChannel:
        """One worker's channel, connected now if the broker answers (never raises)."""
        channel = BrokerChannel(self)
        channel.connect_quietly()
        return channel

    def parts(self, call: Call) -> Parts:
        """What differs between two task messages: the body, the task id, ``kwargsrepr``."""
        message_id = call.message_id
        kwargs = {"body": build_body([call]), "message_id": message_id, **self._shared}
        body = json.dumps([[], kwargs, _EMBED], separators=(",", ":")).encode()
        return body, new_uuid(), kwargsrepr(message_id)

    def headers(self, task_id: str, kwargsrepr: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The headers and properties of one task message."""
        headers = self._headers.copy()
        headers["id"] = headers["root_id"] = task_id
        headers["kwargsrepr"] = kwargsrepr
        properties = self._properties.copy()
        properties["correlation_id"] = task_id
        return headers, properties

    def message(self, call: Call) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        """The body, headers and properties of the task message for one call."""
        body, task_id, kwargsrepr = self.parts(call)
        return (body, *self.headers(task_id, kwargsrepr))

    def redis_list(self, connection: Any, channel: Any) -> Optional[RedisList]:
        """Where a Redis broker lets the messages go straight onto the queue's list."""
        return RedisList.of(
            connection,
            channel,
            queue=self.queue,
            exchange=self.exchange,
            routing_key=self.routing_key,
            headers=self._headers,
            properties=self._properties,
        )

    def warn_broker_error(self, exc: BaseException) -> None:
        """Say what the broker did, at most once a minute (the ledger counts the drop)."""
        with self._throttle_lock:
            allowed = self._throttle.allow("broker_error") is not None
        if allowed:
            logger.warning(
                "flask-koala: could not publish to the Celery broker (%s: %s); calls are "
                "dropped until it answers again",
                type(exc).__name__,
                redact(str(exc)),
            )


class BrokerChannel:
    """One worker's broker connection and producer; one task message per batch."""

    def __init__(self, publisher: CeleryPublisher) -> None:
        self._publisher = publisher
        self._connection: Any = None
        self._producer: Any = None
        self._redis: Optional[RedisList] = None
        self._failure: Optional[tuple[float, Exception]] = None

    def connect(self) -> None:
        """Connect and declare the queue; raises whatever the broker client raises."""
        publisher = self._publisher
        connection = publisher.connection()
        redis = None
        try:
            channel = connection.default_channel
            producer = publisher.celery.amqp.Producer(channel, auto_declare=False)
            producer.maybe_declare(publisher.queue)
            if publisher.fast:
                redis = publisher.redis_list(connection, channel)
                if redis is not None:
                    redis.connect()
        except BaseException:
            if redis is not None:
                redis.close()
            _release(connection)
            raise
        self._connection, self._producer, self._redis = connection, producer, redis

    def connect_quietly(self) -> None:
        """Connect ahead of the first batch; a broker that is down is met again then.

        A failure is kept for the first batch, if it comes within a publish timeout: a
        broker that did not answer a moment ago is not waited on twice in a row.
        """
        try:
            self.connect()
        except Exception as exc:
            logger.debug("flask-koala: connecting to the Celery broker failed", exc_info=True)
            self._failure = (time.monotonic(), exc)

    def handle(self, batch: Sequence[Call]) -> Verdict:
        """Publish the batch as one task message; never raises on broker errors."""
        return self.handle_many([batch])[0]

    def handle_many(self, batches: Sequence[Sequence[Call]]) -> list[Verdict]:
        """Publish each call as a task message of its own, all in one round trip where the
        broker takes them so (a Redis list): they are then published or dropped together.
        Elsewhere one batch at a time, each with its own verdict. Never raises on broker
        errors.
        """
        if len(batches) > 1 and self._redis is None:
            return [self.handle(batch) for batch in batches]
        publisher = self._publisher
        # A fault here is ours.
        messages = [publisher.parts(call) for batch in batches for call in batch]
        try:
            fresh = self._producer is None
            try:
                self._publish(messages)
            except Exception:
                self.close()
                if fresh:
                    raise
                # One reconnect when a kept connection went stale (a restarted broker);
                # anything slower is a broker that is down.
                self._publish(messages)
        except Exception as exc:
            self.close()
            publisher.warn_broker_error(exc)
            error = redact(f"{type(exc).__name__}: {exc}")
            return [Verdict("dropped", "broker_error", error=error)] * len(batches)
        return [_PUBLISHED] * len(batches)

    def _publish(self, messages: Sequence[Parts]) -> None:
        if self._producer is None:
            failure, self._failure = self._failure, None
            if (
                failure is not None
                and time.monotonic() - failure[0] < self._publisher.publish_timeout
            ):
                raise failure[1]
            self.connect()
        redis = self._redis
        before, after = celery_signals.before_task_publish, celery_signals.after_task_publish
        if redis is not None and not before.receivers and not after.receivers:
            redis.push([redis.envelope(*parts) for parts in messages])
            return
        publisher = self._publisher
        exchange, routing_key = publisher.exchange, publisher.routing_key
        full = [(body, *publisher.headers(*ids)) for body, *ids in messages]
        if before.receivers:
            for body, headers, properties in full:
                # As Celery sends it; a receiver may add headers (trace context, say).
                before.send(
                    sender=TASK_NAME,
                    body=tuple(json.loads(body)),
                    exchange=exchange,
                    routing_key=routing_key,
                    declare=[publisher.queue],
                    headers=headers,
                    properties=properties,
                    retry_policy=None,
                )
        if redis is not None:
            redis.push([redis.envelope_of(*message) for message in full])
        else:
            for body, headers, properties in full:
                self._producer.publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers=headers,
                    delivery_mode=PERSISTENT,
                    **properties,
                )
        if after.receivers:
            for body, headers, _ in full:
                after.send(
                    sender=TASK_NAME,
                    body=tuple(json.loads(body)),
                    headers=headers,
                    exchange=exchange,
                    routing_key=routing_key,
                )

    def close(self) -> None:
        """Let the connection go; the next batch connects afresh."""
        connection, self._connection, self._producer = self._connection, None, None
        redis, self._redis = self._redis, None
        if redis is not None:
            redis.close()
        if connection is not None:
            _release(connection)


def _release(connection: Any) -> None:
    try:
        connection.release()
    except Exception:
        logger.debug("flask-koala: closing the broker connection failed", exc_info=True)


class CeleryDispatcher:
    """Publishes each accepted call as a :data:`~flask_koala.celery.TASK_NAME` task.

    The request thread enqueues exactly as in thread mode; one background thread,
    ``flask-koala-1``, publishes. Args as :class:`CeleryPublisher`, plus:

    Args:
        ledger: counts queued, published and dropped calls.
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
        ca_bundle: Optional[str] = None,
        max_queue_size: int = 10_000,
        shutdown_timeout: float = 2.0,
    ) -> None:
        self.handler = CeleryPublisher(
            celery_app,
            endpoint=endpoint,
            timeout=timeout,
            policy=policy,
            queue=queue,
            publish_timeout=publish_timeout,
            ca_bundle=ca_bundle,
        )
        # One thread: a publish takes a fraction of a millisecond while the broker is up.
        # Until the broker has a call a kill loses it, so the thread publishes as soon as a
        # login's response has gone out (no settle), and stays connected while its app
        # lives: a thread that left when idle would reconnect, slowly, after a quiet spell.
        self._engine = Engine(
            self.handler,
            ledger,
            policy=RetryPolicy(attempts=1),  # the worker retries; a broker error drops
            max_workers=1,
            max_queue_size=max_queue_size,
            shutdown_timeout=shutdown_timeout,
            idle_timeout=math.inf,
            settle=0.0,
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
            ca_bundle=config.ca_bundle,
            max_queue_size=config.max_queue_size,
            shutdown_timeout=config.shutdown_timeout,
        )

    def submit(self, call: Call, *, wake: bool = True) -> bool:
        """Queue the call for publishing; never blocks on the broker.

        Inside a request (``wake=False``) the publishing thread is woken once the response
        is out, as the thread engine's workers are: woken at once, it would take the GIL
        from the login it publishes for (some 230 µs a login in ``make bench``).
        """
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
        """Calls queued or being published in this process."""
        return self._engine.pending
