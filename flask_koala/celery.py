"""Durable delivery through Celery (``KOALA_DISPATCHER = "celery"``): the worker side.

What a worker module needs: :func:`register_task`, the task's name :data:`TASK_NAME` and
:class:`DeliveryFailed`. The web side (the engine's publishing handler) is private and
joins this module only through JSON on the broker.

The task needs no Flask app: its arguments carry the ready body (one call), the endpoint,
the call's ``message_id``, the timeout, the retry policy and, when the web app sets
``KOALA_CA_BUNDLE``, that CA bundle's path. It posts once per run and classifies the answer
with :func:`~flask_koala._delivery.attempt`, the thread engine's own rules: 2xx is
delivered, 408/429/5xx and network errors are retried after ``Retry-After`` or the engine's
backoff, any other 4xx fails for good. A retry re-sends the body unchanged, so Koala sees
the same ``message_id`` every time and can drop the duplicate a redelivery may cause.

Whether Koala took a call is known only in the worker, which logs it on the
``flask_koala`` logger and reports it through Celery: the task returns
``{"outcome": "sent", ...}`` or raises :class:`DeliveryFailed`.

Flask is not imported here, nor by importing this module (the package root loads
:class:`~flask_koala.Koala`, and with it Flask, only when asked for); neither is Celery,
which is only ever handed to us.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Optional

from ._config import KoalaConfig, Timeout, endpoint_key
from ._delivery import attempt
from ._exceptions import KoalaError
from ._ledger import Ledger
from ._payload import encode_body, kwargsrepr
from ._redact import redact
from ._retry import RetryPolicy
from ._transport import HTTPTransport, Transport

__all__ = ["TASK_NAME", "DeliveryFailed", "register_task"]

logger = logging.getLogger("flask_koala")

#: The name the delivery task is registered and published under; stable across releases.
TASK_NAME = "flask_koala.deliver"


class DeliveryFailed(KoalaError):
    """Raised by the task, in the worker, when a call will not be delivered.

    It is one of the task's expected errors (Celery's ``throws``): the task ends in state
    ``FAILURE`` and Celery's ``task_failure`` signal fires, without a traceback in the
    worker's log. No email or cookie is in it.

    Attributes:
        reason: ``"http_400"`` and the like, or ``"retries_exhausted"``.
        status: the last HTTP status Koala answered, if any.
        message_id: the id of the call that failed.
    """

    def __init__(
        self, reason: str, status: Optional[int], error: Optional[str], message_id: str
    ) -> None:
        if status is not None:
            answer = f"Koala answered HTTP {status}: {error or '(no error text)'}"
        else:
            answer = f"no answer from Koala ({error or 'no detail'})"
        super().__init__(f"{reason}: {answer}")
        self.reason = reason
        self.status = status
        self.error = error
        self.message_id = message_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles task exceptions; without this it would fall back to KoalaError
        # and treat an expected failure as an unexpected one.
        return (type(self), (self.reason, self.status, self.error, self.message_id))


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
    message_id: str,
    timeout: Any = 5.0,
    policy: Optional[Mapping[str, Any]] = None,
    ca_bundle: Optional[str] = None,
    **_newer: Any,  # arguments a newer web process may add; an older worker ignores them
) -> dict[str, Any]:
    """Post the body once; retry it through Celery, or end the call."""
    retries: int = task.request.retries or 0
    retry_policy = _policy(policy)
    outcome = attempt(_transport(ca_bundle), endpoint, encode_body(body), _timeout(timeout))
    if outcome.outcome == "sent":
        logger.debug(
            "flask-koala: delivered 1 call, HTTP %s, after %d retries", outcome.status, retries
        )
        return {
            "outcome": "sent",
            "status": outcome.status,
            "message_id": message_id,
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
        logger.debug("flask-koala: retrying 1 call in %.2fs (%s)", wait, reason)
        # Celery would re-render kwargsrepr from the arguments, the email among them.
        raise task.retry(countdown=wait, max_retries=None, kwargsrepr=kwargsrepr(message_id))
    error = redact(error, key=endpoint_key(endpoint)) if error else None
    _worker_ledger.warn_failed(1, reason, status=outcome.status, error=error)
    raise DeliveryFailed(reason, outcome.status, error, message_id)


# The worker has no app: its failures are only logged, in the ledger's words and rate.
_worker_ledger = Ledger(lambda: None)


_local = threading.local()


def _transport(ca_bundle: Optional[str]) -> Transport:
    """One keep-alive transport per worker thread and CA bundle, never inherited across a
    fork. A bundle missing on the worker's machine fails its calls as ``ca_bundle_missing``."""
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _local.transports = {}
        _local.pid = pid
    transports: dict[Optional[str], Transport] = _local.transports
    transport = transports.get(ca_bundle)
    if transport is None:
        transport = transports[ca_bundle] = HTTPTransport(ca_bundle=ca_bundle)
    return transport


@atexit.register
def _close_at_exit() -> None:
    """Close the main thread's transports: a solo pool's, or a task run in process.

    Another thread's go with the thread. The main thread's would outlive every finalizer
    and be left open for the interpreter to warn about (``ResourceWarning``) at teardown.
    """
    if getattr(_local, "pid", None) == os.getpid():
        for transport in _local.transports.values():
            transport.close()


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
