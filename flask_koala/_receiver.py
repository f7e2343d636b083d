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
method, 413 for a body over Koala's 32 KiB limit) with ``{"error": "<first violation>"}``, so
a client bug surfaces as the same kind of permanent failure a strict collector would give, and
is listed in ``violations``.

Whatever a client sends, the receiver holds little: a body over the limit is refused from its
``Content-Length`` (or as soon as a chunked body passes it) without being kept, and a
connection that does not deliver a complete request within ``idle_timeout`` seconds of opening
or of its previous answer is closed, so half-sent requests and idle keep-alive connections do
not pile up threads.

Only the standard library is used, and ``http.server`` is imported on the first ``start()``,
so importing this module (for ``check_body``, say) stays cheap.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import ipaddress
import itertools
import json
import logging
import math
import re
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, cast

from ._config import SUSPENDED_ERROR
from ._ids import UUID_TEXT

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import TracebackType

__all__ = ["KoalaReceiver", "ReceivedCall", "check_body"]

logger = logging.getLogger(__name__)

#: How many entries Koala takes per array in one request.
MAX_ENTRIES = 30

#: The largest request body Koala takes, in bytes. Stated here rather than imported from the
#: payload module, so the receiver checks the client's size bound instead of sharing it.
MAX_BODY_BYTES = 32 * 1024

#: Seconds a connection may take to deliver a complete request, by default.
IDLE_TIMEOUT = 5.0

_TOP_LEVEL_KEYS = frozenset({"profile_id", "email", "identifies", "events", "page_views"})
_ARRAYS = ("identifies", "events", "page_views")
_UUID = re.compile(UUID_TEXT)
_SENT_AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_ROUTE = re.compile(r"/web/projects/(?P<key>[^/]*)/(?P<kind>batch|accounts/batch)")
_URL_SAFE_KEY = re.compile(r"[A-Za-z0-9._~-]+")

# How long stop() waits for connection threads; only a blocking on_call can take that long.
_JOIN_TIMEOUT = 5.0

# After refusing a body it did not read, how long the receiver goes on reading (and
# discarding) what the client still sends before closing: closing on unread data makes the
# kernel send a reset, which can destroy the 413 answer before the client reads it.
_LINGER = 2.0


@dataclass(frozen=True)
class ReceivedCall:
    """One HTTP request the receiver read, and what it answered.

    Attributes:
        method: The HTTP method, e.g. ``"POST"``.
        path: The request target as sent, query string included.
        headers: The request headers, names lower-cased (repeated headers joined by ``", "``).
        raw: The request body bytes exactly as received.
        body: The body parsed as JSON, or None when it is not valid UTF-8 JSON.
        public_key: The workspace key from a Koala endpoint path, else None.
        received_at: ``time.monotonic()`` when the request had been read.
        status: The status answered, or None when the connection was dropped unanswered.
        violations: The contract violations of this request (empty when it was valid).
    """

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any
    public_key: str | None
    received_at: float
    status: int | None
    violations: tuple[str, ...]


# --------------------------------------------------------------------------- contract checks


def check_body(body: object) -> list[str]:
    """Return the contract violations of one parsed ``/batch`` request body.

    An empty list means the body is valid. The messages are meant for people reading a failed
    test or the receiver's console output; the first one is what the receiver answers in its
    400 body.
    """
    if not isinstance(body, dict):
        return [f"body must be a JSON object, got {_json_type(body)}"]
    out: list[str] = []
    if "profile_id" not in body and "email" not in body:
        out.append("body must name a person: it has neither profile_id nor email")
    if "profile_id" in body:
        profile_id = body["profile_id"]
        # The visitor id as the pixel writes it: canonical and lowercase.
        if not _is_uuid(profile_id) or profile_id != profile_id.lower():
            out.append(f"profile_id must be a canonical lowercase UUID, got {_show(profile_id)}")
    email = body.get("email")
    if "email" in body and not _is_email(email):
        out.append(f"email must be a non-empty string containing '@', got {_show(email)}")
    for key in sorted(set(body) - _TOP_LEVEL_KEYS, key=str):
        allowed = ", ".join(sorted(_TOP_LEVEL_KEYS))
        out.append(f"unexpected top-level key {key!r} (allowed: {allowed})")
    has_entries = False
    for name in _ARRAYS:
        if name not in body:
            continue
        entries = body[name]
        if not isinstance(entries, list):
            out.append(f"{name} must be an array, got {_json_type(entries)}")
            continue
        if len(entries) > MAX_ENTRIES:
            out.append(f"{name} has {len(entries)} entries, at most {MAX_ENTRIES} are allowed")
        has_entries = has_entries or bool(entries)
        for index, entry in enumerate(entries):
            where = f"{name}[{index}]"
            if not isinstance(entry, dict):
                out.append(f"{where} must be an object, got {_json_type(entry)}")
            elif name == "identifies":
                out.extend(_check_identify(where, entry, email))
            elif name == "events":
                out.extend(_check_track(where, entry))
    if not has_entries:
        out.append("body carries no calls: identifies, events and page_views are absent or empty")
    return out


def _check_identify(where: str, entry: dict[str, Any], email: object) -> list[str]:
    out = []
    if entry.get("type") != "identify":
        out.append(f"{where}.type must be 'identify', got {_field(entry, 'type')}")
    out.extend(_check_sent_at(where, entry))
    traits = entry.get("traits")
    if not isinstance(traits, dict):
        out.append(f"{where}.traits must be an object, got {_field(entry, 'traits')}")
    elif isinstance(email, str) and traits.get("email") != email:
        got = _field(traits, "email")
        out.append(f"{where}.traits.email must equal the top-level email {email!r}, got {got}")
    if "message_id" in entry and not _is_uuid(entry["message_id"]):
        out.append(f"{where}.message_id must be a UUID, got {_show(entry['message_id'])}")
    return out


def _check_track(where: str, entry: dict[str, Any]) -> list[str]:
    out = []
    if entry.get("type") != "track":
        out.append(f"{where}.type must be 'track', got {_field(entry, 'type')}")
    event = entry.get("event")
    if not isinstance(event, str) or not event:
        out.append(f"{where}.event must be a non-empty string, got {_field(entry, 'event')}")
    if not isinstance(entry.get("properties"), dict):
        out.append(f"{where}.properties must be an object, got {_field(entry, 'properties')}")
    out.extend(_check_sent_at(where, entry))
    if "message_id" not in entry:
        out.append(f"{where}.message_id is missing (Koala de-duplicates events by it)")
    elif not _is_uuid(entry["message_id"]):
        out.append(f"{where}.message_id must be a UUID, got {_show(entry['message_id'])}")
    return out


def _check_sent_at(where: str, entry: dict[str, Any]) -> list[str]:
    sent_at = entry.get("sent_at")
    if isinstance(sent_at, str) and _SENT_AT.fullmatch(sent_at):
        try:
            datetime.datetime.fromisoformat(sent_at[:-1])
        except ValueError:
            return [f"{where}.sent_at is not a real date and time: {sent_at!r}"]
        return []
    got = _field(entry, "sent_at")
    return [f"{where}.sent_at must be ISO-8601 UTC with milliseconds and Z, got {got}"]


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def _is_email(value: object) -> bool:
    return isinstance(value, str) and "@" in value


def _field(mapping: dict[str, Any], key: str) -> str:
    return _show(mapping[key]) if key in mapping else "nothing"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and Koala) does not.
    raise ValueError(f"{name} is not valid JSON")


def _parse(raw: bytes) -> tuple[Any, str | None]:
    """Parse a request body as strict UTF-8 JSON; return (value, error)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except (ValueError, RecursionError) as exc:
        return None, f"body is not valid JSON: {exc}"


def _check_headers(headers: dict[str, str]) -> list[str]:
    out = []
    content_type = headers.get("content-type")
    if content_type is None:
        out.append("Content-Type header is missing, expected application/json")
    else:
        media, *params = (part.strip() for part in content_type.split(";"))
        if media.lower() != "application/json":
            out.append(f"Content-Type is {content_type!r}, expected application/json")
        for param in params:
            if param and param.lower().replace(" ", "") not in {"charset=utf-8", 'charset="utf-8"'}:
                out.append(f"Content-Type parameter {param!r} is not allowed, only charset=utf-8")
    if not headers.get("user-agent", "").strip():
        out.append("User-Agent header is missing or empty (Koala may drop it as bot traffic)")
    return out


class _Check(NamedTuple):
    """The verdict on one request, before faults are considered."""

    public_key: str | None
    body: Any
    violations: list[str]
    status: int  # what to answer if there are violations


def _check_request(method: str, path: str, headers: dict[str, str], raw: bytes) -> _Check:
    body, parse_error = _parse(raw) if raw else (None, "body is empty")
    route, _, query = path.partition("?")
    match = _ROUTE.fullmatch(route)
    if match is None:
        expected = "/web/projects/{PUBLIC_KEY}/batch"
        return _Check(None, body, [f"{path!r} is not a Koala endpoint, expected {expected}"], 404)
    key, kind = match["key"], match["kind"]
    if method != "POST":
        return _Check(key, body, [f"method {method} is not allowed, Koala takes POST"], 405)
    out = []
    if not key:
        out.append("the public key in the path is empty")
    elif not _URL_SAFE_KEY.fullmatch(key):
        out.append(f"the public key {key!r} in the path is not URL-safe")
    if query:
        out.append(f"unexpected query string {query!r}, Koala's endpoints take none")
    out.extend(_check_headers(headers))
    if parse_error is not None:
        out.append(parse_error)
    elif kind == "batch":
        out.extend(check_body(body))
    elif not isinstance(body, dict):
        out.append(f"body must be a JSON object, got {_json_type(body)}")
    return _Check(key, body, out, 400)


# --------------------------------------------------------------------------- answers


class _Answer(NamedTuple):
    """What to send back; a None status means close the connection without a word."""

    status: int | None
    payload: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


_OK = _Answer(200, b"{}")
_DROP = _Answer(None)
_SUSPENDED = _Answer(400, json.dumps({"error": SUSPENDED_ERROR}).encode())


def _error_answer(status: int, message: str) -> _Answer:
    headers = (("Allow", "POST"),) if status == 405 else ()
    return _Answer(status, json.dumps({"error": message}).encode(), headers=headers)


def _injected(
    status: int, body: dict[str, Any] | str | None, retry_after: str | float | None
) -> _Answer:
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"status must be an int from 200 to 599, got {status!r}")
    content_type = "application/json"
    if body is None:
        payload = json.dumps({"error": f"injected {status}"} if status >= 400 else {}).encode()
    elif isinstance(body, str):
        payload = body.encode()
        if _parse(payload)[1] is not None:
            content_type = "text/plain; charset=utf-8"
    else:
        payload = json.dumps(body).encode()
    headers: tuple[tuple[str, str], ...] = ()
    if retry_after is not None:
        if isinstance(retry_after, float) and retry_after.is_integer():
            retry_after = int(retry_after)
        headers = (("Retry-After", str(retry_after)),)
    return _Answer(status, payload, content_type, headers)


# --------------------------------------------------------------------------- the server


class _Run:
    """One run of the server, start() to stop(): what stop() must wake, shut down and join."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        # A self-pipe: stop() writes to it to wake the accept loop at once, where
        # serve_forever() would only notice a shutdown at its next poll.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count(1)

    def serve(self, server: ThreadingHTTPServer) -> None:
        """Accept connections until ``stop_serving()``; the ``koala-receiver`` thread."""
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self.stopping.is_set():
                ready = [key.fileobj for key, _ in selector.select()]
                if server.socket in ready and not self.stopping.is_set():
                    server.handle_request()  # accepts and hands off to a connection thread

    def stop_serving(self) -> None:
        """Make ``serve()`` return, and requests held by a delay give up waiting."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def add(self, sock: socket.socket, target: Callable[[], None]) -> threading.Thread:
        with self._lock:
            name = f"koala-receiver-conn-{next(self._numbers)}"
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            self._sockets.add(sock)
        return thread

    def discard(self, sock: socket.socket) -> None:
        # Under the lock, so close_all() never shuts down a socket while it is being closed.
        with self._lock:
            self._sockets.discard(sock)

    def close_all(self) -> None:
        """Shut every open connection down, which wakes a thread blocked reading from it."""
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # the peer may have gone already
                    sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in threads if thread.is_alive()]
        if stuck:
            logger.warning("KoalaReceiver.stop(): threads still running: %s", ", ".join(stuck))

    def close(self) -> None:
        self._wake_reader.close()
        self._wake_writer.close()


_ServerFactory = Callable[[tuple[str, int], "KoalaReceiver", _Run], "ThreadingHTTPServer"]


@functools.cache
def _server_class() -> _ServerFactory:
    """Build the server classes on first use, so importing this module skips http.server."""
    import socketserver
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        timeout = 0  # handle_request() is only called once a connection is waiting

        def __init__(self, address: tuple[str, int], receiver: KoalaReceiver, run: _Run) -> None:
            self.receiver = receiver
            self.run = run
            if ":" in address[0]:
                self.address_family = socket.AF_INET6
            super().__init__(address, Handler)

        def server_bind(self) -> None:
            # HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup that can
            # take seconds; the name is never used here.
            socketserver.TCPServer.server_bind(self)
            host, port = self.socket.getsockname()[:2]
            self.server_name, self.server_port = str(host), int(port)

        def process_request(self, request: Any, client_address: Any) -> None:
            # ThreadingMixIn forgets daemon threads; keep them so stop() can end and join them.
            thread = self.run.add(
                request, functools.partial(self.process_request_thread, request, client_address)
            )
            thread.start()

        def shutdown_request(self, request: Any) -> None:
            self.run.discard(request)
            super().shutdown_request(request)

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client hanging up mid-request is routine here; never print tracebacks to stderr.
            logger.debug("KoalaReceiver: error on a connection", exc_info=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real clients pool connections
        server_version = "KoalaReceiver"
        # Headers and body go out in two writes; with Nagle's algorithm the second waits for
        # the client's delayed ACK, adding ~40 ms to every answer on a kept-alive connection.
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            receiver = cast("Server", self.server).receiver
            self.reader = _DeadlineReader(self.connection, receiver._idle_timeout)
            self.rfile = io.BufferedReader(self.reader)

        def log_message(self, format: str, *args: Any) -> None:
            """Stay silent; ``on_call`` is how callers see traffic."""

        def version_string(self) -> str:
            return self.server_version  # no Python version in the Server header

        def dispatch(self) -> None:
            server = cast("Server", self.server)
            server.receiver._serve(self, self.reader, server.run)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = dispatch

    return Server


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, each allowed only until the current request's deadline.

    A timeout per read would let a client that sends a byte now and then hold its thread
    forever; a deadline per request bounds the idle wait before a request and the time to send
    one alike. ``restart()`` starts the clock again once an answer went out.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self.deadline = time.monotonic() + timeout

    def restart(self) -> None:
        self.deadline = time.monotonic() + self._timeout
        self._sock.settimeout(self._timeout)  # for the answer's writes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            # socket.timeout, which BaseHTTPRequestHandler catches (TimeoutError from 3.10 on)
            raise socket.timeout("the request took longer than idle_timeout")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _BadFraming(Exception):
    """The body's length cannot be told, so the connection cannot be reused."""


class _TooLarge(Exception):
    """The body is over the size limit; it was not (all) read, so the connection must close."""


def _read_body(handler: BaseHTTPRequestHandler, limit: int) -> bytes:
    """Read the body by Content-Length (or chunked), so keep-alive finds the next request."""
    transfer_encoding = handler.headers.get("Transfer-Encoding")
    if transfer_encoding is not None:
        if transfer_encoding.strip().lower() != "chunked":
            raise _BadFraming(f"unsupported Transfer-Encoding {transfer_encoding!r}")
        return _read_chunked(handler, limit)
    length = handler.headers.get("Content-Length")
    if length is None:
        return b""
    try:
        size = int(length)
    except ValueError:
        raise _BadFraming(f"invalid Content-Length {length!r}") from None
    if size < 0:
        raise _BadFraming(f"invalid Content-Length {length!r}")
    if size > limit:
        raise _TooLarge(f"body is {size} bytes, over Koala's limit of {limit} bytes")
    return _read_exactly(handler, size)


def _read_chunked(handler: BaseHTTPRequestHandler, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = handler.rfile.readline(65537)
        if not line:
            raise ConnectionError("client closed the connection mid-body")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadFraming(f"invalid chunk size line {line[:40]!r}") from None
        if size == 0:
            while handler.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers: ignored
            return b"".join(chunks)
        total += size
        if total > limit:
            raise _TooLarge(f"chunked body is over Koala's limit of {limit} bytes")
        chunks.append(_read_exactly(handler, size))
        handler.rfile.readline(65537)  # the CRLF closing the chunk


def _read_exactly(handler: BaseHTTPRequestHandler, size: int) -> bytes:
    data = handler.rfile.read(size)
    if len(data) < size:
        raise ConnectionError("client closed the connection mid-body")
    return data


def _linger(sock: socket.socket) -> None:
    """Read and discard what the client still sends, for a while, then let it be closed."""
    deadline = time.monotonic() + _LINGER
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # the answer is complete: the client may read it now
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(65536):
                return


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _send(handler: BaseHTTPRequestHandler, status: int, answer: _Answer) -> None:
    handler.send_response(status)
    for name, value in answer.headers:
        handler.send_header(name, value)
    if handler.close_connection:  # the client asked for it, or the framing was broken
        handler.send_header("Connection", "close")
    without_body = status in (204, 304)
    if not without_body:
        handler.send_header("Content-Type", answer.content_type)
        handler.send_header("Content-Length", str(len(answer.payload)))
    handler.end_headers()
    if not without_body and handler.command != "HEAD":
        handler.wfile.write(answer.payload)


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
            Koala's limit of 32 KiB.
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
        self._faults: deque[_Answer] = deque()
        self._outage: tuple[float, _Answer] | None = None
        self._suspended = False
        self._delay = 0.0
        # The running server; its own lock, so stop() never holds the state lock while joining.
        self._lifecycle = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._run: _Run | None = None
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
            run = _Run()
            try:
                server = _server_class()((self._host, self._requested_port), self, run)
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
        if not _is_loopback(str(bound)):
            logger.warning(
                "KoalaReceiver is listening on %s, which is not a loopback address: other "
                "machines can send calls to it. Bind 127.0.0.1 unless that is what you want.",
                self.url,
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
        host = f"[{self._host}]" if ":" in self._host else self._host
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

    def _serve(self, handler: BaseHTTPRequestHandler, reader: _DeadlineReader, run: _Run) -> None:
        """Answer one request; called on the connection's thread."""
        method, path = handler.command, handler.path
        headers: dict[str, str] = {}
        for name, value in handler.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else str(value)
        too_large = False
        try:
            raw = _read_body(handler, self._max_body_bytes)
        except OSError:
            # The client left mid-body, or took longer than idle_timeout: nothing to record.
            handler.close_connection = True
            return
        except _BadFraming as exc:
            check = _Check(None, None, [str(exc)], 400)
            raw = b""
            handler.close_connection = True  # where the next request starts is unknown
        except _TooLarge as exc:
            match = _ROUTE.fullmatch(path.partition("?")[0])
            check = _Check(match["key"] if match else None, None, [str(exc)], 413)
            raw = b""
            handler.close_connection = too_large = True  # the rest of the body is unread
        else:
            check = _check_request(method, path, headers, raw)
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
            _send(handler, answer.status, answer)
            if too_large:
                _linger(handler.connection)
        if self._on_call is not None:
            try:
                self._on_call(call)
            except Exception:
                logger.exception("KoalaReceiver on_call callback failed")

    def _choose(self, check: _Check) -> _Answer:
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
