"""Exceptions raised by flask-koala.

The tree is small on purpose: flask-koala never raises into a request, so the exceptions a
user meets are about setting it up, and the one a custom transport raises.

    KoalaError
    ├── ConfigError      a KOALA_* setting is missing or wrong (raised by ``init_app``)
    └── TransportError   a request to Koala got no HTTP answer (raised by a transport, and
                         by a custom one given as ``Koala(transport_factory=...)``)
"""

from __future__ import annotations

__all__ = ["ConfigError", "KoalaError", "TransportError"]


class KoalaError(Exception):
    """Base class of every exception flask-koala raises."""


class ConfigError(KoalaError, ValueError, RuntimeError):
    """A ``KOALA_*`` setting is missing or invalid.

    The message always names the key to fix. It is a ``ValueError`` (a bad value) and a
    ``RuntimeError`` (what Flask-SQLAlchemy raises for bad configuration), so code written
    against either convention catches it.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"{key}: {problem}")


class TransportError(KoalaError):
    """A request to Koala got no HTTP answer.

    The default client raises it, and so should a custom transport
    (``Koala(transport_factory=...)``): the call is retried, or ends ``failed`` at once when
    ``retryable`` is false. Any other exception from a transport ends the call
    ``failed.internal_error``.

    Attributes:
        reason: ``"timeout"``, ``"connection_error"``, or for a setting that cannot work
            ``"proxy_unsupported"``, ``"proxy_invalid"``, ``"ca_bundle_missing"`` or
            ``"ca_bundle_invalid"``; the call's retry or failure reason.
        detail: what happened, for the log (without credentials).
        retryable: ``False`` when trying again cannot help (the environment names a proxy
            or a CA bundle that cannot be used): the call ends ``failed`` at once.
    """

    def __init__(self, reason: str, detail: str, *, retryable: bool = True) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
