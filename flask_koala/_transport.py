"""The one seam between flask-koala and the network.

A :class:`Transport` posts one body and says what came back; it never retries and never
decides anything. Each delivery thread owns one, so connections are kept alive without
being shared across threads. Tests hand in their own through ``Koala(transport_factory=)``,
or point the default one at a loopback receiver.

Exceptions::

    TransportError        no HTTP answer: timeout, refused, reset (worth a retry), or a
                          setting of the environment that cannot work (``retryable`` False)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Protocol, Union, cast
from urllib.parse import urlsplit

import httptools
import requests
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH, select_proxy
from requests.utils import prepend_scheme_if_needed as _untyped_prepend_scheme

from ._config import Timeout
from ._exceptions import ConfigError, TransportError
from ._http_answer import (
    AnswerReader,
    BadAnswer,
    Response,
    Silent,
    read_answer,
    remaining,
)

__all__ = [
    "HTTPTransport",
    "Response",
    "Transport",
    "TransportError",
    "TransportFactory",
    "check_ca_bundle",
]

logger = logging.getLogger("flask_koala")

_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a socket without a timeout raises where it would have to wait (TLS may have to read
# in order to write).
_NOT_YET = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Transport(Protocol):
    """Posts a body to a URL; one instance is used by one thread at a time."""

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        """Send the body; raise :class:`TransportError` when no answer came back."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

    # Optional: ``abort()``, called from another thread by ``shutdown(timeout)`` once its
    # time is up, cuts a ``post`` in flight short (it then raises ``TransportError``).


TransportFactory = Callable[[], Transport]

# A socket, a TLS socket, or TLS inside a TLS tunnel (an https:// proxy).
_Socket = Any
# One of socket.getaddrinfo()'s answers: family, type, protocol, canonical name, address.
_Address = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


@dataclasses.dataclass(frozen=True)
class _Route:
    """Where one URL's requests go, decided once per URL as ``requests.post`` would."""

    host: str  # where the TCP connection goes: the target, or the proxy
    port: int
    tls: bool  # TLS to ``host``
    tunnel: bytes  # a CONNECT request to send first (an https target through a proxy)
    target_host: str  # the name TLS checks when tunnelling
    head: bytes  # the request line and headers up to "Content-Length: "
    context: Optional[ssl.SSLContext]
    refusal: Optional[TransportError]  # set when the environment cannot work


class HTTPTransport:
    """Keep-alive HTTP/1.1 for one thread: one connection, reused from call to call.

    The request line and headers are rendered once per URL and written with the body in
    one ``sendall``; the answer is parsed by ``httptools`` (llhttp, the parser uvicorn and
    Node use), reading at most 2 KiB of its body. The whole attempt, connecting included,
    gets ``connect + read`` seconds, so a server that trickles its answer cannot hold a
    worker; each wait for the answer gets ``read`` at most, as in ``requests``. Proxies,
    proxy credentials and the CA bundle come from the environment exactly as
    ``requests.post`` takes them, read again whenever the URL changes.

    Args:
        ca_bundle: a CA bundle file or directory (``KOALA_CA_BUNDLE``); when set it wins
            over ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` and certifi's bundle.
    """

    def __init__(self, ca_bundle: Optional[str] = None) -> None:
        self._ca_bundle = ca_bundle
        self._url = ""
        self._headers: dict[str, str] = {}
        self._route: Optional[_Route] = None
        self._sock: _Socket = None
        self._tcp: Optional[socket.socket] = None  # the socket owning the descriptor
        self._reader: Optional[AnswerReader] = None  # the connection's, made at its first post
        self._finalizer: Optional[weakref.finalize] = None  # type: ignore[type-arg]

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        # A per-read timeout alone lets a server that trickles its answer hold a worker
        # (and a flush) forever: the whole attempt gets connect + read seconds.
        deadline = time.monotonic() + connect + read
        route = self._route
        if route is None or url != self._url or headers != self._headers:
            route = self._aim(url, headers)
        if route.refusal is not None:
            raise route.refusal
        request = b"%b%d\r\n\r\n%b" % (route.head, len(body), body)
        try:
            if self._tcp is not None and _over(self._tcp):
                # The server closed the idle keep-alive connection (its FIN is in): a new
                # one, before anything is sent. A close after the request was sent is an
                # error of this attempt, retried (and counted) as the policy says.
                self._drop()
            if self._sock is None:
                answer = self._connect(route, connect, read, deadline)
                if answer is not None:
                    return answer  # the proxy refused the tunnel (e.g. 407)
            return self._exchange(request, read, deadline)
        except socket.timeout as exc:  # TimeoutError from Python 3.10
            self._drop()
            raise TransportError("timeout", str(exc) or type(exc).__name__) from None
        except Silent:
            self._drop()
            raise TransportError(
                "connection_error", "the connection closed without an answer"
            ) from None
        except (OSError, httptools.HttpParserError, BadAnswer) as exc:
            self._drop()
            raise TransportError("connection_error", str(exc) or type(exc).__name__) from None

    def close(self) -> None:
        self._drop()
        self._url = ""
        self._route = None

    def abort(self) -> None:
        """From another thread: end the exchange in flight, whatever it waits for.

        The TCP connection is shut down, so a blocked send or read returns at once and
        ``post`` raises ``TransportError``; the owning thread still closes the socket. An
        attempt still connecting ends at its connect timeout.
        """
        tcp = self._tcp
        if tcp is not None:
            with contextlib.suppress(OSError):
                # socket's own shutdown, not SSLSocket's, which would unwrap the TLS
                # object under the reading thread instead of just ending its read.
                socket.socket.shutdown(tcp, socket.SHUT_RDWR)

    # -- the connection --------------------------------------------------------------

    def _aim(self, url: str, headers: Mapping[str, str]) -> _Route:
        """Decide the route for ``url`` (it reads the environment) and render its head."""
        self.close()
        route = _route(url, headers, self._ca_bundle)
        self._url = url
        self._headers = dict(headers)
        self._route = route
        return route

    def _connect(
        self, route: _Route, connect: float, read: float, deadline: float
    ) -> Optional[Response]:
        """Open the connection (through the proxy's tunnel if any); an answer if refused."""
        addresses = socket.getaddrinfo(route.host, route.port, type=socket.SOCK_STREAM)
        sock: _Socket = _open(addresses, connect, deadline)
        self._keep(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if route.tls:
            assert route.context is not None
            sock.settimeout(remaining(deadline))
            sock = route.context.wrap_socket(sock, server_hostname=route.host)
            self._keep(sock)
        if route.tunnel:
            sock.settimeout(remaining(deadline))
            sock.sendall(route.tunnel)
            answer = read_answer(sock, deadline, read, tunnel=True)[1]
            if not 200 <= answer.status <= 299:
                self._drop()
                return answer
            assert route.context is not None
            sock.settimeout(remaining(deadline))
            if route.tls:  # TLS inside the proxy's TLS
                from urllib3.util.ssltransport import SSLTransport

                sock = SSLTransport(sock, route.context, route.target_host)
            else:
                sock = route.context.wrap_socket(sock, server_hostname=route.target_host)
            self._keep(sock)
        return None

    def _exchange(self, request: bytes, read: float, deadline: float) -> Response:
        sock = self._sock
        _send(sock, request, read, deadline)
        reader = self._reader
        if reader is None:
            reader = self._reader = AnswerReader()
        status, answer = reader.read(sock, deadline, read, tunnel=False)
        if status < 0:  # not kept alive: the server said so, or the body was left unread
            self._drop()
        return answer

    def _keep(self, sock: _Socket) -> None:
        """Hold ``sock`` as the connection; it is closed when this transport is collected."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._sock = sock
        if isinstance(sock, socket.socket):  # wrapping TLS moves the descriptor to it
            self._tcp = sock
        # A transport dropped without close() (a sync app never shut down) must not keep
        # its socket. The finalizer holds the socket only, never this transport, or the
        # transport could never be collected.
        self._finalizer = weakref.finalize(self, sock.close)
        # Not at exit: finalizers run before the exit flush, and would cut the connection
        # under a worker still delivering; the process closes the socket anyway.
        self._finalizer.atexit = False  # type: ignore[misc,unused-ignore]

    def _drop(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        sock, self._sock = self._sock, None
        self._tcp = None
        self._reader = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _open(addresses: Sequence[_Address], connect: float, deadline: float) -> socket.socket:
    """A connection to the first of ``addresses`` that takes one, as
    ``socket.create_connection`` makes it, but within the attempt's deadline: each address
    gets ``connect`` seconds at most and all of them together what the deadline leaves (a
    host with several unreachable addresses would otherwise take ``connect`` seconds each).
    """
    error: Optional[OSError] = None
    for family, kind, proto, _, address in addresses:
        timeout = min(connect, remaining(deadline))  # socket.timeout once it has passed
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error if error is not None else OSError("the host name resolved to no address")


def _over(tcp: socket.socket) -> bool:
    """Whether an idle kept-alive connection is over: the server closed or reset it, or sent
    bytes nobody asked for. One non-blocking peek at the TCP stream, under TLS too (it
    reads no record, so the TLS layer never knows)."""
    tcp.settimeout(0.0)
    try:
        socket.socket.recv(tcp, 1, socket.MSG_PEEK)  # b"" (closed) or bytes: over either way
    except _NOT_YET:
        return False
    except OSError:
        pass  # reset
    except (AttributeError, TypeError, ValueError):
        # A socket made before gevent patched the module: write, and learn afterwards.
        return False
    return True


def _send(sock: _Socket, request: bytes, wait: float, deadline: float) -> None:
    """Write the whole request, each wait at most ``wait`` seconds and none past ``deadline``.

    A request fits in the send buffer of a connection waiting for its next request, so it
    is written at once, without the poll a socket with a timeout makes before each write;
    only what did not fit is waited for. Sockets proper only: urllib3's ``SSLTransport``
    (TLS inside a TLS proxy) could lose bytes it had encrypted, so it always waits.
    """
    remaining(deadline)  # raises once the attempt's time is up: nothing is sent then
    sent = 0
    if isinstance(sock, socket.socket):
        sock.settimeout(0.0)
        try:
            sent = sock.send(request)
        except _NOT_YET:
            sent = 0  # TLS wants the very same bytes again
        if sent == len(request):
            return
    sock.settimeout(min(wait, remaining(deadline)))
    sock.sendall(memoryview(request)[sent:] if sent else request)


# -- the route, as requests.post would take it ------------------------------------------

_contexts: dict[str, ssl.SSLContext] = {}
prepend_scheme_if_needed = cast(Callable[[str, str], str], _untyped_prepend_scheme)
_reported: set[str] = set()


def _route(url: str, headers: Mapping[str, str], ca_bundle: Optional[str]) -> _Route:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS.get(scheme, 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = _authority(host, port, scheme)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    extra = "" if _has(headers, "accept-encoding") else "Accept-Encoding: identity\r\n"
    refusal: Optional[TransportError] = None

    session = requests.Session()
    try:
        # The very calls requests.post makes: proxies from the environment (NO_PROXY
        # included), and REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE over certifi's bundle.
        settings = session.merge_environment_settings(url, {}, None, None, None)
        named = select_proxy(url, settings["proxies"])
        proxy = named
        proxy_headers: dict[str, str] = {}
        malformed = False
        if named:
            try:
                proxy = prepend_scheme_if_needed(named, "http")
                adapter = cast(HTTPAdapter, session.get_adapter(url))
                headers_for = cast(Callable[[str], dict[str, str]], adapter.proxy_headers)
                proxy_headers = headers_for(proxy)  # Proxy-Authorization from user:pw@
            except ValueError:  # urllib3's LocationParseError among them
                malformed = True
    finally:
        session.close()
    verify = settings["verify"]
    context: Optional[ssl.SSLContext] = None
    if ca_bundle is not None:
        verify = ca_bundle  # KOALA_CA_BUNDLE wins
    if verify is True or verify is None:
        verify = DEFAULT_CA_BUNDLE_PATH
    needs_tls = scheme == "https"

    if proxy:
        variable = _proxy_variable(named or "", scheme)
        proxy_scheme, proxy_host, proxy_port = "", "", 0
        try:
            proxy_parts = urlsplit(proxy)
            proxy_scheme = proxy_parts.scheme.lower()
            proxy_host = proxy_parts.hostname or ""
            proxy_port = proxy_parts.port or _DEFAULT_PORTS.get(proxy_scheme, 80)
        except ValueError:
            malformed = True
        if malformed:
            refusal = _refuse("proxy_invalid", f"{variable} names a proxy URL that cannot be read")
        elif proxy_scheme not in ("http", "https"):
            refusal = _refuse(
                "proxy_unsupported",
                f"{variable} names a {proxy_scheme}:// proxy, which flask-koala cannot use "
                "(it speaks to http:// and https:// proxies, as requests does without extras)",
            )
        elif not proxy_host:
            refusal = _refuse("proxy_invalid", f"{variable} names a proxy URL without a host")
        needs_tls = needs_tls or proxy_scheme == "https"
    if needs_tls and refusal is None:
        context, problem = _context(verify, "KOALA_CA_BUNDLE" if ca_bundle else None)
        if problem is not None:
            refusal = problem
    auth = "".join(f"{name}: {value}\r\n" for name, value in proxy_headers.items())

    if not proxy or refusal is not None:
        head = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n{lines}{extra}Content-Length: "
        return _Route(
            host=host,
            port=port,
            tls=scheme == "https",
            tunnel=b"",
            target_host=host,
            head=head.encode("latin-1"),
            context=context,
            refusal=refusal,
        )
    if scheme == "https":
        where = _authority(host, port, "")  # always with the port, as CONNECT wants
        tunnel = f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n{auth}\r\n"
        head = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n{lines}{extra}Content-Length: "
    else:
        # An http:// target through a proxy: the whole URL on the request line.
        tunnel = ""
        target = f"http://{authority}{path}"
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {authority}\r\n{auth}{lines}{extra}Content-Length: "
        )
    return _Route(
        host=proxy_host,
        port=proxy_port,
        tls=proxy_scheme == "https",
        tunnel=tunnel.encode("latin-1"),
        target_host=host,
        head=head.encode("latin-1"),
        context=context,
        refusal=None,
    )


def _authority(host: str, port: int, scheme: str) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port == _DEFAULT_PORTS.get(scheme) else f"{name}:{port}"


def _has(headers: Mapping[str, str], name: str) -> bool:
    return any(key.lower() == name for key in headers)


def _proxy_variable(proxy: str, scheme: str) -> str:
    """The environment variable that named ``proxy``, for messages (never its value)."""
    for key in (scheme, "all"):
        for name in (f"{key}_proxy", f"{key.upper()}_PROXY"):
            if os.environ.get(name) == proxy:
                return name
    return f"{scheme.upper()}_PROXY"


def _context(
    verify: Union[str, bool], key: Optional[str]
) -> tuple[Optional[ssl.SSLContext], Optional[TransportError]]:
    """The TLS context that trusts ``verify`` (a file or directory), shared by transports."""
    if verify is False:
        verify = DEFAULT_CA_BUNDLE_PATH  # never switch verification off
    path = str(verify)
    context = _contexts.get(path)
    if context is not None:
        return context, None
    variable = key or (
        "REQUESTS_CA_BUNDLE" if os.environ.get("REQUESTS_CA_BUNDLE") else "CURL_CA_BUNDLE"
    )
    if not os.path.exists(path):
        return None, _refuse(
            "ca_bundle_missing", f"{variable} names a CA bundle that does not exist"
        )
    try:
        return _trusting(path), None
    except (ssl.SSLError, OSError, ValueError):
        return None, _refuse("ca_bundle_invalid", f"{variable} {_UNREADABLE}")


_UNREADABLE = "names a CA bundle that holds no certificate flask-koala can read (PEM)"


def _trusting(path: str) -> ssl.SSLContext:
    """The shared TLS context trusting the CA bundle at ``path``, a PEM file or a directory
    of hashed certificates (read lazily, so never refused here); made once per path."""
    context = _contexts.get(path)
    if context is None:
        if os.path.isdir(path):
            context = ssl.create_default_context(capath=path)
        else:
            context = ssl.create_default_context(cafile=path)
        _contexts[path] = context
    return context


def check_ca_bundle(path: Optional[str]) -> None:
    """Refuse a ``KOALA_CA_BUNDLE`` that exists but cannot be read, at ``init_app``.

    Raises:
        ConfigError: naming the key.
    """
    if path is None:
        return
    try:
        _trusting(path)
    except (ssl.SSLError, OSError, ValueError):
        raise ConfigError("KOALA_CA_BUNDLE", f"{_UNREADABLE}: {path!r}") from None


def _refuse(reason: str, message: str) -> TransportError:
    """The error every call gets for a setting that cannot work, logged once per process."""
    if message not in _reported:
        _reported.add(message)
        logger.error("flask-koala: %s; calls to Koala fail until this is changed", message)
    return TransportError(reason, message, retryable=False)
