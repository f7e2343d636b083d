"""Reading and checking the ``KOALA_*`` settings, once, into one frozen object.

Every rule here runs in ``init_app`` so that a mistake stops the app at start-up with a
message naming the key, instead of surfacing later as calls that silently go nowhere.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit

from ._exceptions import ConfigError

__all__ = ["DEFAULT_API_URL", "SUSPENDED_ERROR", "KoalaConfig", "Timeout", "load_config"]

DEFAULT_API_URL = "https://api2.getkoala.com"
#: Koala's error text on every call since its ingest was suspended (see koala-api.md).
SUSPENDED_ERROR = "Koala ingest suspended"
MISSING_COOKIE_POLICIES = ("skip", "defer", "mint")
DISPATCHERS = ("thread", "celery")

#: A timeout in seconds, or a ``(connect, read)`` pair, as requests and urllib3 take it.
Timeout = Union[float, tuple[float, float]]

# Characters that would change the meaning of the URL the key is spliced into.
_UNSAFE_KEY = re.compile(r"[/?#%\s\x00-\x1f\x7f]")
# What a key may hold once the named characters are ruled out: URL-unreserved ASCII, so it
# can be spliced into the path as is (Koala's keys are pk_ and hex).
_KEY = re.compile(r"[A-Za-z0-9._~-]+")
_URL_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")
# RFC 6265's cookie-name: a token, so it cannot end a header line or start an attribute.
_COOKIE_NAME = re.compile(r"[!#$&'*+\-.^_`|~0-9A-Za-z]+")
# A DNS name, optionally with the leading dot browsers ignore: labels of letters, digits,
# '-' and '_' (no ';', ',', '=', whitespace: nothing that can add a cookie attribute).
_DOMAIN_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_COOKIE_DOMAIN = re.compile(rf"\.?{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*")
# The API URL's host: a name or IPv4 address, or an IPv6 address in brackets.
_URL_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
# What a URL path may hold as is (RFC 3986 pchar and '/'): what an HTTP client sends
# unchanged, so the URL validated here is the URL requested.
_URL_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:/%-]*")
#: The most delivery threads one app may start (``KOALA_MAX_WORKERS``).
MAX_WORKERS = 64
#: The longest ``KOALA_TIMEOUT``, ``KOALA_SHUTDOWN_TIMEOUT`` and
#: ``KOALA_CELERY_PUBLISH_TIMEOUT``, in seconds: an hour.
MAX_WAIT = 3600.0


@dataclasses.dataclass(frozen=True)
class KoalaConfig:
    """The effective settings of one app, after defaults and checks."""

    public_key: Optional[str] = None
    api_url: str = DEFAULT_API_URL
    cookie_name: str = "ko_id"
    enabled: bool = True
    suppress_send: bool = False
    #: ``KOALA_SUPPRESS_SEND`` is unset: suppression follows ``app.testing`` at each call.
    suppress_follows_testing: bool = False
    sync: bool = False
    identify_on_login: bool = True
    identify_on_remember: bool = True
    timeout: Timeout = 5.0
    max_workers: int = 4
    max_queue_size: int = 10_000
    max_retries: int = 6
    shutdown_timeout: float = 2.0
    missing_cookie: str = "skip"
    defer_max_age: float = 86_400.0
    cookie_domain: Optional[str] = None
    sdk_url: Optional[str] = None
    sdk_settings: Optional[Mapping[str, Any]] = None
    snippet_identify: bool = True
    csp_nonce: Optional[Callable[[], Optional[str]]] = None
    inject_script: bool = False
    dispatcher: str = "thread"
    celery_queue: str = "koala"
    # With the engine's backoff (0.5 s doubling, capped at 30 s, full jitter) a retry waits
    # 15 s on average once the cap is reached: 1000 retries keep a call alive for about
    # 4 hours (15.75 s for the first six, then 994 x 15 s = 14,926 s).
    celery_max_retries: int = 1000
    celery_publish_timeout: float = 1.0
    # A CA bundle file or directory for TLS to Koala (and to an https:// proxy); None: as
    # requests would (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's bundle).
    ca_bundle: Optional[str] = None

    @property
    def sending(self) -> bool:
        """Whether calls may open a connection at all."""
        return self.enabled and not self.suppress_send

    @property
    def endpoint(self) -> str:
        """The profile batch URL calls are posted to."""
        return f"{self.api_url}/web/projects/{self.public_key or ''}/batch"

    @property
    def api_is_local(self) -> bool:
        """Whether ``api_url`` names this machine (a loopback collector), not Koala."""
        return _is_loopback(urlsplit(self.api_url).hostname or "")

    @property
    def sending_mode(self) -> str:
        """How calls leave while sending is on: ``"sync"`` or the dispatcher."""
        return "sync" if self.sync else self.dispatcher

    def while_testing(self, testing: object) -> KoalaConfig:
        """These settings while ``app.testing`` is ``testing``.

        With ``KOALA_SUPPRESS_SEND`` unset, suppression follows ``app.testing`` at each call
        (the request path reads it live), not the value ``init_app`` saw: an app fixture may
        set ``TESTING`` after the factory ran. Whatever reports or sends outside a request
        (the ``flask koala`` commands) reads the settings through here.
        """
        suppress = bool(testing)
        if not self.suppress_follows_testing or self.suppress_send == suppress:
            return self
        return dataclasses.replace(self, suppress_send=suppress)

    @property
    def mode(self) -> str:
        """One word for how calls end up: disabled, suppressed, sync or the dispatcher."""
        if not self.enabled:
            return "disabled"
        if self.suppress_send:
            return "suppressed"
        return self.sending_mode


def endpoint_key(endpoint: str) -> str:
    """The workspace key in an endpoint :attr:`KoalaConfig.endpoint` built."""
    return endpoint.rsplit("/", 2)[-2]


def load_config(config: Mapping[str, Any], *, testing: bool = False) -> KoalaConfig:
    """Build a :class:`KoalaConfig` from a Flask ``app.config``.

    Raises:
        ConfigError: a key has a value that cannot work; the message names it.
    """
    d = KoalaConfig()
    enabled = _bool(config, "KOALA_ENABLED", d.enabled)
    suppress = _bool(config, "KOALA_SUPPRESS_SEND", testing)
    public_key = _public_key(config, required=enabled and not suppress)
    sync = _bool(config, "KOALA_SYNC", d.sync)
    dispatcher = _choice(config, "KOALA_DISPATCHER", d.dispatcher, DISPATCHERS)
    if sync and dispatcher == "celery":
        raise ConfigError(
            "KOALA_SYNC",
            "True sends each call on the thread that makes it, and KOALA_DISPATCHER = "
            "'celery' hands it to a Celery worker: set only one of the two",
        )
    values = KoalaConfig(
        public_key=public_key,
        api_url=_api_url(config),
        cookie_name=_cookie_name(config),
        enabled=enabled,
        suppress_send=suppress,
        suppress_follows_testing="KOALA_SUPPRESS_SEND" not in config,
        sync=sync,
        identify_on_login=_bool(config, "KOALA_IDENTIFY_ON_LOGIN", d.identify_on_login),
        identify_on_remember=_bool(config, "KOALA_IDENTIFY_ON_REMEMBER", d.identify_on_remember),
        timeout=_timeout(config),
        max_workers=_max_workers(config),
        max_queue_size=_positive_int(config, "KOALA_MAX_QUEUE_SIZE", d.max_queue_size),
        max_retries=_positive_int(config, "KOALA_MAX_RETRIES", d.max_retries),
        shutdown_timeout=_wait(config, "KOALA_SHUTDOWN_TIMEOUT", d.shutdown_timeout),
        missing_cookie=_choice(
            config, "KOALA_MISSING_COOKIE", d.missing_cookie, MISSING_COOKIE_POLICIES
        ),
        defer_max_age=_seconds(config, "KOALA_DEFER_MAX_AGE", d.defer_max_age),
        cookie_domain=_cookie_domain(config),
        sdk_url=_sdk_url(config),
        sdk_settings=_sdk_settings(config),
        snippet_identify=_bool(config, "KOALA_SNIPPET_IDENTIFY", d.snippet_identify),
        csp_nonce=_optional_callable(config, "KOALA_CSP_NONCE"),
        inject_script=_bool(config, "KOALA_INJECT_SCRIPT", d.inject_script),
        dispatcher=dispatcher,
        celery_queue=_non_empty_str(config, "KOALA_CELERY_QUEUE", d.celery_queue),
        celery_max_retries=_positive_int(config, "KOALA_CELERY_MAX_RETRIES", d.celery_max_retries),
        celery_publish_timeout=_wait(
            config, "KOALA_CELERY_PUBLISH_TIMEOUT", d.celery_publish_timeout
        ),
        ca_bundle=_ca_bundle(config),
    )
    return values


def _bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be True or False, not {value!r}")
    return value


def _public_key(config: Mapping[str, Any], *, required: bool) -> Optional[str]:
    key = "KOALA_PUBLIC_KEY"
    value = config.get(key)
    if value is None or value == "":
        if required:
            raise ConfigError(
                key,
                "is required while sending is on: set it to your Koala workspace's public key "
                "(pk_...), or set KOALA_SUPPRESS_SEND = True or KOALA_ENABLED = False",
            )
        return None
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {type(value).__name__}")
    if not value.strip("."):
        # "." and ".." are path segments that clients and proxies collapse: the calls
        # would go to another URL than /web/projects/{key}/batch.
        raise ConfigError(key, f"must be a workspace key (pk_...), not {value!r}")
    if _UNSAFE_KEY.search(value) or not _KEY.fullmatch(value):
        raise ConfigError(
            key,
            "must be URL-safe: letters, digits and . _ ~ - only (no '/', '?', '#', '%', "
            "whitespace, control or non-ASCII characters)",
        )
    if value[:3].lower() == "sk_":
        # The browser snippet would publish it in every page, and each call its URL.
        raise ConfigError(
            key,
            "looks like a secret key (sk_...): flask-koala takes the workspace's public "
            "key (pk_...), which the browser snippet shows in every page",
        )
    return value


def _api_url(config: Mapping[str, Any]) -> str:
    key = "KOALA_API_URL"
    value = config.get(key, DEFAULT_API_URL)
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be an http(s) URL, not {type(value).__name__}")
    # First, and without showing the value: it may hold a password.
    if "@" in value:
        raise ConfigError(
            key,
            "must not hold user:password@ (or any '@'): credentials in this URL are never "
            "sent; put an authenticating proxy in HTTPS_PROXY instead",
        )
    if _URL_UNSAFE.search(value) or "\\" in value or not value.isascii():
        # A backslash is a path separator to some parsers and not to others, so the host
        # checked here and the host a proxy connects to could differ.
        raise ConfigError(
            key,
            f"must not contain whitespace, control characters, backslashes or non-ASCII "
            f"characters (use the xn-- form of a host name), not {value!r}",
        )
    try:
        parts = urlsplit(value)
    except ValueError:  # Python >= 3.11.4 checks a bracketed IPv6 host itself
        raise ConfigError(key, f"has a bad host: {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(key, f"must be an http:// or https:// URL with a host, not {value!r}")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ConfigError(key, "must not carry a query string or fragment")
    host = _host_and_port(key, parts.netloc)
    if not _URL_PATH.fullmatch(parts.path):
        raise ConfigError(key, f"has characters a URL path cannot hold: {value!r}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigError(
            key,
            "plain http:// is only allowed to a loopback host (localhost, 127.0.0.0/8, ::1); "
            "use https:// for anything else",
        )
    return value.rstrip("/")


def _host_and_port(key: str, netloc: str) -> str:
    """The host of ``host[:port]``, once both are known to be well formed."""
    if netloc.startswith("["):
        host, bracket, rest = netloc.partition("]")
        host += bracket
        if rest and not rest.startswith(":"):
            rest = "?"  # text after the bracket that is not a port: refused below
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = netloc.partition(":")
        port = port_text if colon else None
    if not _URL_HOST.fullmatch(host):
        raise ConfigError(key, f"must name a host (a DNS name or an IP address), not {host!r}")
    if port is not None and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ConfigError(key, f"has a bad port {port!r}: give a number from 1 to 65535")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigError(key, f"has a bad IPv6 address {host!r}") from None
        return host[1:-1]
    return host


def _sdk_url(config: Mapping[str, Any]) -> Optional[str]:
    key = "KOALA_SDK_URL"
    value = _optional_str(config, key)
    if value is None:
        return None
    if _URL_UNSAFE.search(value):
        raise ConfigError(key, "must not contain whitespace or control characters")
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        parts, host = urlsplit(""), None
    # First, and without showing the value: user:password@ would be in every page's HTML.
    # (An '@' in the path, as in a CDN's package@version, is fine.)
    if "@" in parts.netloc or (host is None and "@" in value):
        raise ConfigError(
            key, "must not hold user:password@: the URL is written into every page's HTML"
        )
    if host is None or parts.scheme not in ("http", "https"):
        raise ConfigError(key, f"must be an http:// or https:// URL with a host, not {value!r}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigError(
            key,
            "plain http:// is only allowed to a loopback host (localhost, 127.0.0.0/8, ::1); "
            "browsers block an http:// script on an https:// page, so use https://",
        )
    return value


def _sdk_settings(config: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    key = "KOALA_SDK_SETTINGS"
    value = _optional_mapping(config, key)
    if value is None:
        return None
    try:
        # A deep copy through JSON: what the page gets is fixed now, whatever happens to
        # the dict in app.config later.
        copy: dict[str, Any] = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(
            key, f"must hold only JSON values (dicts, lists, strings, numbers, bools): {exc}"
        ) from None
    return copy


def _ca_bundle(config: Mapping[str, Any]) -> Optional[str]:
    key = "KOALA_CA_BUNDLE"
    value = config.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(key, f"must be the path of a CA bundle file or directory, not {value!r}")
    path = os.fspath(value)
    if not isinstance(path, str) or not os.path.exists(path):
        raise ConfigError(
            key, f"names {value!r}, which does not exist: give a CA bundle file or directory"
        )
    return path


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cookie_name(config: Mapping[str, Any]) -> str:
    key = "KOALA_COOKIE_NAME"
    value = config.get(key, "ko_id")
    if not isinstance(value, str) or not _COOKIE_NAME.fullmatch(value):
        raise ConfigError(key, f"must be a valid cookie name, not {value!r}")
    return value


def _cookie_domain(config: Mapping[str, Any]) -> Optional[str]:
    key = "KOALA_COOKIE_DOMAIN"
    value = _optional_str(config, key)
    if value is None:
        return None
    # Werkzeug writes the value into the Set-Cookie header as is: anything but a domain
    # would add attributes of its own ("; SameSite=None") or break the header.
    if len(value) > 254 or not _COOKIE_DOMAIN.fullmatch(value):
        raise ConfigError(
            key,
            f"must be a domain such as 'example.com' or '.example.com', not {value!r} "
            "(letters, digits, '-', '_' and dots only; use the xn-- form of a non-ASCII name)",
        )
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(key, f"must be a positive whole number, not {value!r}")
    return value


def _max_workers(config: Mapping[str, Any]) -> int:
    key = "KOALA_MAX_WORKERS"
    value = _positive_int(config, key, KoalaConfig.max_workers)
    if value > MAX_WORKERS:
        raise ConfigError(
            key,
            f"must be at most {MAX_WORKERS}, not {value}: one app's calls go to one "
            "collector, and more threads only add memory and contention",
        )
    return value


def _positive_float(
    config: Mapping[str, Any], key: str, default: float, maximum: Optional[float] = None
) -> float:
    value = config.get(key, default)
    if not _number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a positive number of seconds, not {value!r}")
    if maximum is not None and value > maximum:
        # Sockets and locks refuse waits past what the platform's time_t holds (about
        # 1e9 seconds): a larger value would fail every call, not wait longer.
        raise ConfigError(key, f"must be at most {maximum:g} seconds, not {value!r}")
    return float(value)


def _wait(config: Mapping[str, Any], key: str, default: float) -> float:
    return _positive_float(config, key, default, MAX_WAIT)


def _seconds(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return _positive_float({key: value}, key, default)


def _timeout(config: Mapping[str, Any]) -> Timeout:
    key = "KOALA_TIMEOUT"
    value = config.get(key, KoalaConfig.timeout)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(key, f"must be seconds or a (connect, read) pair, not {value!r}")
        connect = _wait({key: value[0]}, key, 0)
        read = _wait({key: value[1]}, key, 0)
        return (connect, read)
    return _wait({key: value}, key, 0)


def _choice(config: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = config.get(key, default)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigError(key, f"must be one of {listed}, not {value!r}")
    return str(value)


def _optional_str(config: Mapping[str, Any], key: str) -> Optional[str]:
    value = config.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {type(value).__name__}")
    return value


def _non_empty_str(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, not {value!r}")
    return value


def _optional_mapping(config: Mapping[str, Any], key: str) -> Optional[Mapping[str, Any]]:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a dict, not {type(value).__name__}")
    return dict(value)


def _optional_callable(config: Mapping[str, Any], key: str) -> Optional[Callable[[], Any]]:
    value = config.get(key)
    if value is None:
        return None
    if not callable(value):
        raise ConfigError(key, f"must be a callable returning the request's nonce, not {value!r}")
    return value  # type: ignore[no-any-return]
