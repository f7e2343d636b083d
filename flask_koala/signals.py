"""Blinker signals for the end of every call, so an app can watch delivery.

Each signal is sent with the Flask app as sender (connect with ``sender=app`` to hear one
app only) and these keyword arguments:

``message_id``
    The call's id (a UUID string), or ``None`` for a call skipped before it got one.
``kind``
    ``"identify"`` or ``"track"``.
``email``, ``profile_id``
    Who the call is about, as the app itself handed them over; ``None`` when unknown.
``reason``
    Why it ended this way (for example ``"no_cookie"``, ``"queue_full"``, ``"http_400"``,
    ``"retries_exhausted"``); ``None`` on :data:`call_sent`.
``status``
    The HTTP status Koala answered, when there was one; otherwise ``None``.
``error``
    For :data:`call_failed`: Koala's error text (``"Koala ingest suspended"``) or the
    network error, with anything email-like masked; otherwise ``None``.

:data:`call_accepted` is sent when a call is accepted, with ``body``: the request body the
call alone would be sent as. ``record_calls()`` is built on it.

Signals sent from the delivery threads run there: keep receivers quick and thread-safe.
An exception in a receiver is logged and never reaches the login or the worker.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["call_accepted", "call_dropped", "call_failed", "call_sent", "call_skipped"]

_signals = Namespace()

#: A call was accepted for delivery (or, with sending suppressed, recorded).
call_accepted = _signals.signal("koala-call-accepted")
#: Koala answered 2xx for the call.
call_sent = _signals.signal("koala-call-sent")
#: The call ended without delivery: a final 4xx, retries exhausted, or shutdown mid-retry.
call_failed = _signals.signal("koala-call-failed")
#: The call was never attempted: the queue was full, or the extension was shut down.
call_dropped = _signals.signal("koala-call-dropped")
#: The call was not made: no or bad cookie, no or bad email, bad traits, disabled.
call_skipped = _signals.signal("koala-call-skipped")
