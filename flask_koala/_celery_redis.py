"""Celery mode's fast path on a Redis broker: task messages pushed straight onto the queue.

kombu's Redis transport puts each message with a ``redis.Redis`` client it builds for that
message (over half of a publish's CPU with redis-py 5+), one round trip per message. Here
the message is the envelope kombu's virtual channel writes (``prepare_message``, the
channel's body encoding, a delivery tag, the delivery info), pushed onto the list a worker
reads with one ``LPUSH`` written on one long-lived connection of the channel's own pool:

- **Encoded once.** The envelope around the task's JSON body is a template, made when the
  channel opens by encoding kombu's envelope with markers in place of what changes per
  message (the body, the task id, ``kwargsrepr``, the delivery tag); a message is the
  template filled in, not a second ``json.dumps`` of a dict of dicts.
- **Several messages per round trip.** ``LPUSH key m1 m2 ...`` puts them in the order given,
  as that many ``LPUSH`` commands would, all or none; the worker pops the oldest first.
- **redis-py's connection, not its client.** A connection made as the pool makes them
  (TLS, a password, the db, a unix socket, timeouts: whatever the broker URL and
  transport options set up), with the command written in RESP and its one reply read back:
  no pool checkout, no per-command bookkeeping.

Used only where that list is simply the queue's name: an anonymous-exchange route, no
priorities, no expiry (see :meth:`RedisList.of`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from ._ids import new_uuid

__all__ = ["PERSISTENT", "RedisList"]

logger = logging.getLogger("flask_koala")

PERSISTENT = 2  # AMQP delivery mode, as Celery's default

# What changes per message, in the order the template takes it; text json.dumps leaves alone.
_MARKS = ("@koala.body@", "@koala.id@", "@koala.kwargsrepr@", "@koala.tag@")


class RedisList:
    """Publishes task messages onto one queue's Redis list; not thread-safe (one per channel).

    Args:
        channel: kombu's Redis channel, for its connection pool, body encoding and key prefix.
        routing_key: the queue's name, which is the list's.
        headers: Celery's task headers for this app, as a template (``id``, ``root_id`` and
            ``kwargsrepr`` are filled in per message).
        properties: the message properties, as a template (``correlation_id`` per message).
    """

    def __init__(
        self,
        channel: Any,
        routing_key: str,
        headers: Mapping[str, Any],
        properties: Mapping[str, Any],
    ) -> None:
        self._channel = channel
        self._routing_key = routing_key
        key = (getattr(channel, "global_keyprefix", "") or "") + routing_key
        self._key = key.encode()
        pool = channel.pool
        self._connection: Any = pool.connection_class(**pool.connection_kwargs)
        body, task_id, kwargsrepr, tag = _MARKS
        text = self._envelope(
            body,
            {**headers, "id": task_id, "root_id": task_id, "kwargsrepr": kwargsrepr},
            {**properties, "correlation_id": task_id},
            tag,
        )
        text = text.replace("{", "{{").replace("}", "}}")
        for number, mark in enumerate(_MARKS):
            text = text.replace(mark, f"{{{number}}}")
        self._template = text

    @classmethod
    def of(
        cls,
        connection: Any,
        channel: Any,
        *,
        queue: Any,
        exchange: str,
        routing_key: str,
        headers: Mapping[str, Any],
        properties: Mapping[str, Any],
    ) -> Optional[RedisList]:
        """The fast path for this channel, or ``None`` where kombu must route the message."""
        simple = (
            getattr(connection.transport, "driver_type", None) == "redis"
            and exchange == ""
            and not queue.max_priority
            and not queue.expires
            and not queue.queue_arguments
            and list(getattr(channel, "priority_steps", [0]))[:1] == [0]
            and hasattr(channel, "pool")
        )
        if not simple:
            return None
        try:
            return cls(channel, routing_key, headers, properties)
        except Exception:  # a transport or client unlike kombu's and redis-py's own
            logger.debug("flask-koala: publishing through kombu's producer", exc_info=True)
            return None

    def connect(self) -> None:
        """Connect now; raises whatever redis-py raises."""
        self._connection.connect()

    def envelope(self, body: bytes, task_id: str, kwargsrepr: str) -> bytes:
        """The message for the task with this body, ids and ``kwargsrepr``, ready to push."""
        return self._template.format(
            _json_text(self._encode(body)), task_id, _json_text(kwargsrepr), new_uuid()
        ).encode()

    def envelope_of(
        self, body: bytes, headers: Mapping[str, Any], properties: Mapping[str, Any]
    ) -> bytes:
        """The message with these very headers and properties (a signal receiver's, say)."""
        return self._envelope(self._encode(body), headers, properties, new_uuid()).encode()

    def push(self, messages: Sequence[bytes]) -> None:
        """Put the messages on the list, oldest first, in one command; raises on any error."""
        key = self._key
        parts = [b"*%d\r\n$5\r\nLPUSH\r\n$%d\r\n%s\r\n" % (len(messages) + 2, len(key), key)]
        for message in messages:
            parts.append(b"$%d\r\n%s\r\n" % (len(message), message))
        connection = self._connection
        connection.send_packed_command([b"".join(parts)])  # PINGs first after a long idle
        connection.read_response()  # raises redis-py's ResponseError for an error reply

    def close(self) -> None:
        """Let the connection go (never raises)."""
        try:
            self._connection.disconnect()
        except Exception:
            logger.debug("flask-koala: closing the Redis connection failed", exc_info=True)

    def _encode(self, body: bytes) -> str:
        channel = self._channel
        encoded, _ = channel.encode_body(body, channel.body_encoding)
        return encoded.decode() if isinstance(encoded, bytes) else str(encoded)

    def _envelope(
        self, body: str, headers: Mapping[str, Any], properties: Mapping[str, Any], tag: str
    ) -> str:
        """kombu's envelope, as its virtual channel's ``basic_publish`` would make it."""
        channel = self._channel
        message = channel.prepare_message(
            body,
            0,
            "application/json",
            "utf-8",
            dict(headers),
            {**properties, "delivery_mode": PERSISTENT},
        )
        message["properties"].update(body_encoding=channel.body_encoding, delivery_tag=tag)
        message["properties"]["delivery_info"].update(exchange="", routing_key=self._routing_key)
        return json.dumps(message)


def _json_text(text: str) -> str:
    """The text as it stands inside a JSON string."""
    return json.dumps(text)[1:-1]
