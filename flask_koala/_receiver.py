"""A loopback Koala: a real HTTP server that speaks Koala's ingest contract.

Koala's own hosts answer every request with 400 today, and no test, example or benchmark may
reach the internet anyway, so flask-koala is tested, demonstrated and measured against this
receiver instead. It checks every request against the documented contract (``check_body``
holds the body rules), records it, and can be told to misbehave the ways a real collector
does: error statuses with ``Retry-After``, outages, the "ingest suspended" answer, latency,
hangs and dropped connections. ::

    with KoalaReceiver() as koala:
        app.config["KOALA_API_URL"] = koala.url
        ...  # log someone in
        assert koala.wait_for(1)
        assert koala.violations == []

A request that breaks the contract is answered 400 (404 for an unknown path, 405 for a wrong
method, 413 for a body over the 32 KiB that flask-koala keeps every call within) with
``{"error": "<first violation>"}``, so a client bug surfaces as the same kind of permanent
failure a strict collector would give, and is listed in ``violations``.

Whatever a client sends, the receiver holds little: a body over the limit is refused from its
``Content-Length`` (or as soon as a chunked body passes it) without being kept, and a
connection that does not deliver a complete request within ``idle_timeout`` seconds of opening
or of its previous answer is closed, so half-sent requests and idle keep-alive connections do
not pile up threads.

Only the standard library is used, and ``http.server`` is imported on the first ``start()``,
so importing this module (for ``check_body``, say) stays cheap.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from ._config import SUSPENDED_ERROR
from ._contract import (
    MAX_BODY_BYTES,
    ROUTE,
    Check,
    ReceivedCall,
    check_body,
    check_request,
    parse_json,
)
from ._loopback_http import (
    Answer,
    BadFraming,
    DeadlineReader,
    Run,
    TooLarge,
    is_loopback,
    linger,
    local_address,
    read_body,
    send_answer,
    server_class,
)

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import TracebackType

__all__ = ["KoalaReceiver", "ReceivedCall", "check_body"]

logger = logging.getLogger(__name__)

#: Seconds a connection may take to deliver a complete request, by default.
IDLE_TIMEOUT = 5.0

# How long stop() waits for connection threads; only a blocking on_call can take that long.
_JOIN_TIMEOUT = 5.0

_OK = Answer(200, b"{}")
_DROP = Answer(None)
_SUSPENDED = Answer(400, json.dumps({"error": SUSPENDED_ERROR}).encode())


def _error_answer(status: int, message: str) -> Answer:
    headers = (("Allow", "POST"),) if status == 405 else ()
    return Answer(status, json.dumps({"error": message}).encode(), headers=headers)


def _injected(
    status: int, body: dict[str, Any] | str | None, retry_after: str | float | None
) -> Answer:
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"status must be an int from 200 to 599, got {status!r}")
    content_type = "application/json"
    if body is None:
        payload = json.dumps({"error": f"injected {status}"} if status >= 400 else {}).encode()
    elif isinstance(body, str):
        payload = body.encode()
        if parse_json(payload)[1] is not None:
            content_type = "text/plain; charset=utf-8"
    else:
        payload = json.dumps(body).encode()
    headers: tuple[tuple[str, str], ...] = ()
    if retry_after is not None:
        if isinstance(retry_after, float) and retry_after.is_integer():
            retry_after = int(retry_after)
        headers = (("Retry-After", str(retry_after)),)
    return Answer(status, payload, content_type, headers)


class KoalaReceiver:
    """A loopback HTTP server that checks, records and answers Koala ingest calls.

    It serves on ``127.0.0.1`` in a daemon thread; point ``KOALA_API_URL`` at ``url``. Every
    request is recorded in ``calls``; those answered 2xx (valid ones, unless a fault says
    otherwise) are "delivered" and their bodies kept in ``bodies``. All methods are
    thread-safe and may be called while serving.

    Fault injection decides each answer in this order: one-shot faults queued by
    ``respond_with`` and ``drop_connections`` (first asked, first used), then an ``outage``,
    then ``suspend``, then the contract check. ``delay`` applies to every request on top.

    Args:
        host: The interface to bind; keep the default so nothing leaves the machine. Any
            address that is not a loopback one (``0.0.0.0`` included) is logged as a warning
            on ``start()``: other machines can then send to it.
        port: The port to bind; 0 picks a free one on ``start()``.
        on_call: Called with each ``ReceivedCall`` after it was answered (or dropped), on the
            connection's thread. Exceptions it raises are logged and swallowed so a broken
            printer cannot take the server down. The CLI uses it to print traffic.
        max_body_bytes: The largest body accepted; a larger one is answered 413 with a JSON
            error and recorded as a violation, without being read into memory. Defaults to
            the 32 KiB limit flask-koala keeps every call within (Koala documents none).
        idle_timeout: Seconds a connection may take to deliver a complete request, counted
            from its opening or from its previous answer; past it the connection is closed
            without an answer (and nothing is recorded). Bounds idle keep-alive connections
            and half-sent requests alike.
        clock: The monotonic clock ``outage()`` is timed with; a test may pass a fake one.

    Raises:
        ValueError: ``max_body_bytes`` is not a positive int, or ``idle_timeout`` is not a
            positive, finite number.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_call: Callable[[ReceivedCall], None] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int):
            raise ValueError(f"max_body_bytes must be an int, got {max_body_bytes!r}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes!r}")
        if not (idle_timeout > 0 and math.isfinite(idle_timeout)):
            raise ValueError(f"idle_timeout must be finite and > 0, got {idle_timeout!r}")
        self._host = host
        self._requested_port = port
        self._on_call = on_call
        self._max_body_bytes = max_body_bytes
        self._idle_timeout = float(idle_timeout)
        self._clock = clock
        # All recorded state and fault settings, guarded by one lock.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._arrived = 0  # requests read, answered or not yet
        self._calls: list[ReceivedCall] = []
        self._bodies: list[dict[str, Any]] = []
        self._violations: list[str] = []
        self._faults: deque[Answer] = deque()
        self._outage: tuple[float, Answer] | None = None
        self._suspended = False
        self._delay = 0.0
        # The running server; its own lock, so stop() never holds the state lock while joining.
        self._lifecycle = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._run: Run | None = None
        self._port: int | None = None

    def __repr__(self) -> str:
        where = self.url if self._port is not None or self._requested_port else "not started"
        return f"<KoalaReceiver {where} calls={len(self.calls)}>"

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> KoalaReceiver:
        """Bind the port and serve in a daemon thread named ``koala-receiver``.

        Returns:
            self, so ``receiver = KoalaReceiver().start()`` reads well.

        Raises:
            RuntimeError: It is already running.
            OSError: The port cannot be bound.
        """
        with self._lifecycle:
            if self._server is not None:
                raise RuntimeError("KoalaReceiver is already running; stop() it first")
            run = Run()
            try:
                server = server_class()(
                    (self._host, self._requested_port), self._serve, self._idle_timeout, run
                )
            except BaseException:
                run.close()
                raise
            thread = threading.Thread(
                target=run.serve, args=(server,), name="koala-receiver", daemon=True
            )
            try:
                thread.start()
            except BaseException:
                server.server_close()
                run.close()
                raise
            self._server, self._thread, self._run = server, thread, run
            bound, self._port = server.socket.getsockname()[:2]
        if not is_loopback(str(bound)):
            logger.warning(
                "KoalaReceiver is listening on %s, which is not a loopback address: other "
                "machines can send calls to it. Bind 127.0.0.1 unless that is what you want.",
                f"{bound}:{self._port}",
            )
        return self

    def stop(self) -> None:
        """Stop serving and end every thread the receiver started; calling it again is a no-op.

        Open keep-alive connections are shut down (their clients see the connection close)
        and requests held by ``delay`` are dropped at once, so this returns quickly.
        """
        # Held throughout, so a concurrent stop() returns only once all is down and a start()
        # waits until the port is free again.
        with self._lifecycle:
            server, thread, run = self._server, self._thread, self._run
            self._server = self._thread = self._run = None
            if server is None or thread is None or run is None:
                return
            run.stop_serving()  # also wakes requests waiting out a delay()
            thread.join()  # the accept loop is done: no new connection threads after this
            run.close_all()  # blocked keep-alive reads see EOF, so their threads exit
            run.join(_JOIN_TIMEOUT)
            server.server_close()
            run.close()

    def __enter__(self) -> KoalaReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (or the one asked for, before the first ``start()``)."""
        if self._port is not None:
            return self._port
        if self._requested_port:
            return self._requested_port
        raise RuntimeError("KoalaReceiver picks its port in start(); start it first")

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``: the value for ``KOALA_API_URL``."""
        host = local_address(self._host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    # ----------------------------------------------------------------------- what was seen

    @property
    def calls(self) -> list[ReceivedCall]:
        """Every request received, in arrival order (a copy)."""
        with self._lock:
            return list(self._calls)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The parsed bodies of the requests answered 2xx, i.e. delivered, in order (a copy)."""
        with self._lock:
            return list(self._bodies)

    @property
    def violations(self) -> list[str]:
        """Every contract violation seen, each prefixed with its request's method and path."""
        with self._lock:
            return list(self._violations)

    def message_ids(self) -> list[str]:
        """The ``message_id`` of every identify and track entry delivered, in order.

        Koala de-duplicates by ``message_id``, so this is what a test compares to check that
        retries reuse ids and that nothing was delivered twice.
        """
        ids = []
        for body in self.bodies:
            for name in ("identifies", "events"):
                entries = body.get(name)
                if not isinstance(entries, list):
                    continue
                for entry in entries:
                    if isinstance(entry, dict) and isinstance(entry.get("message_id"), str):
                        ids.append(entry["message_id"])
        return ids

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` bodies were delivered; False if ``timeout`` ran out."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._bodies) >= count, timeout)

    def wait_for_calls(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` requests were answered (and recorded), delivered or not.

        For faults, where nothing is delivered: wait for the client's retries to arrive.
        """
        with self._changed:
            return self._changed.wait_for(lambda: len(self._calls) >= count, timeout)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` requests were read, answered or not yet.

        A request held by ``delay()`` counts as soon as it is read, before it is answered and
        appears in ``calls``: what a test waits for before acting on a request in flight.
        ``reset()`` starts the count again.
        """
        with self._changed:
            return self._changed.wait_for(lambda: self._arrived >= count, timeout)

    def reset(self) -> None:
        """Forget every call, body and violation, and lift every fault (delay included)."""
        with self._changed:
            self._arrived = 0
            self._calls.clear()
            self._bodies.clear()
            self._violations.clear()
            self._faults.clear()
            self._outage = None
            self._suspended = False
            self._delay = 0.0
            self._changed.notify_all()

    # ----------------------------------------------------------------------- faults

    def respond_with(
        self,
        *statuses: int,
        body: dict[str, Any] | str | None = None,
        retry_after: str | float | None = None,
    ) -> None:
        """Answer the next ``len(statuses)`` requests with these statuses, in order.

        They queue after faults already queued. Such a request counts as delivered only if
        its injected status is 2xx, whatever its content.

        Args:
            statuses: HTTP statuses from 200 to 599.
            body: The answer body: a dict is sent as JSON, a str verbatim. Defaults to
                ``{"error": "injected <status>"}`` for errors and ``{}`` otherwise.
            retry_after: A ``Retry-After`` header value: seconds, or an HTTP date string.

        Raises:
            ValueError: A status is outside 200-599.
        """
        answers = [_injected(status, body, retry_after) for status in statuses]
        with self._lock:
            self._faults.extend(answers)

    def outage(self, seconds: float, status: int = 503) -> None:
        """Answer every request with ``status`` for the next ``seconds``, then recover."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        answer = _injected(status, None, None)
        with self._lock:
            self._outage = (self._clock() + seconds, answer)

    def suspend(self) -> None:
        """Answer everything 400 ``{"error": "Koala ingest suspended"}``, as Koala does today."""
        with self._lock:
            self._suspended = True

    def resume(self) -> None:
        """Undo ``suspend()``."""
        with self._lock:
            self._suspended = False

    def delay(self, seconds: float) -> None:
        """Hold every following answer for ``seconds`` (0 turns it off).

        Simulates latency, or a hang past the client's timeout. ``stop()`` cuts the wait short
        and drops the held requests.
        """
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        with self._lock:
            self._delay = float(seconds)

    def drop_connections(self, count: int = 1) -> None:
        """Read the next ``count`` requests, then close their connections without an answer.

        The client sees the server hang up (``RemoteDisconnected``, or a connection error in
        ``requests``). Queued with ``respond_with`` faults, in the order asked for.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count!r}")
        with self._lock:
            self._faults.extend([_DROP] * count)

    # ----------------------------------------------------------------------- serving

    def _serve(self, handler: BaseHTTPRequestHandler, reader: DeadlineReader, run: Run) -> None:
        """Answer one request; called on the connection's thread."""
        method, path = handler.command, handler.path
        headers: dict[str, str] = {}
        for name, value in handler.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else str(value)
        too_large = False
        try:
            raw = read_body(handler, self._max_body_bytes)
        except OSError:
            # The client left mid-body, or took longer than idle_timeout: nothing to record.
            handler.close_connection = True
            return
        except BadFraming as exc:
            check = Check(None, None, [str(exc)], 400)
            raw = b""
            handler.close_connection = True  # where the next request starts is unknown
        except TooLarge as exc:
            match = ROUTE.fullmatch(path.partition("?")[0])
            check = Check(match["key"] if match else None, None, [str(exc)], 413)
            raw = b""
            handler.close_connection = too_large = True  # the rest of the body is unread
        else:
            check = check_request(method, path, headers, raw)
        received_at = time.monotonic()
        with self._changed:
            self._arrived += 1
            self._changed.notify_all()

        with self._lock:
            delay = self._delay
        interrupted = delay > 0 and run.stopping.wait(delay)

        with self._changed:
            answer = _DROP if interrupted else self._choose(check)
            call = ReceivedCall(
                method=method,
                path=path,
                headers=headers,
                raw=raw,
                body=check.body,
                public_key=check.public_key,
                received_at=received_at,
                status=answer.status,
                violations=tuple(check.violations),
            )
            # Recorded before answering, so a client that got its answer can assert at once.
            self._calls.append(call)
            self._violations.extend(f"{method} {path}: {v}" for v in check.violations)
            delivered = answer.status is not None and 200 <= answer.status < 300
            if delivered and isinstance(check.body, dict):
                self._bodies.append(check.body)
            self._changed.notify_all()

        reader.restart()
        if answer.status is None:
            handler.close_connection = True
        else:
            send_answer(handler, answer.status, answer)
            if too_large:
                linger(handler.connection)
        if self._on_call is not None:
            try:
                self._on_call(call)
            except Exception:
                logger.exception("KoalaReceiver on_call callback failed")

    def _choose(self, check: Check) -> Answer:
        """Pick the answer for a request; the caller holds the lock."""
        if self._faults:
            return self._faults.popleft()
        if self._outage is not None:
            until, answer = self._outage
            if self._clock() < until:
                return answer
            self._outage = None
        if self._suspended:
            return _SUSPENDED
        if check.violations:
            return _error_answer(check.status, check.violations[0])
        return _OK
